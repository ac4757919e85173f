"""Model family adapters and the offline model builder (DESIGN §7, §8).

* :mod:`epd.models.geometry` — placeholder-token math from ``preprocessor_config.json`` (no weights).
* :mod:`epd.models.qwen2_vl` — :class:`Qwen2VLAdapter`: encode / prefill / decode_step / KV cache.
* :mod:`epd.models.qwen2_vl_parts` — per-role parts (``role_parts``) and the model with only those loaded.
* :mod:`epd.models.weights` — partial safetensors loading: each role reads only its parts' tensors.
* :mod:`epd.models.build` — ``build_model(preset, out_dir, seed)``: tokenizer + random-init checkpoint.

Import the submodules directly; this package stays light (no transformers import).
"""
