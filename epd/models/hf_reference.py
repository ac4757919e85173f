"""Hugging Face reference path for a Qwen2-VL model directory: processor and inputs.

Used where we compare against (or time) plain ``model.generate``: the tests' exactness
checks and the benchmarks' in-process baseline. Placeholder expansion here is HF's own
(``Qwen2VLProcessor``), independent of the gateway's ``ImageGeometry`` math.
"""

from __future__ import annotations

from pathlib import Path


def hf_processor(model_dir: Path):
    """An image-only ``Qwen2VLProcessor`` (tokenizer + image processor, no video processor).

    The stock processor cannot be built without torchvision (its video processor needs it);
    this subclass skips the video part and keeps HF's own placeholder expansion
    (``replace_image_token``) and ``mm_token_type_ids``.
    """
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super(Qwen2VLProcessor, self).__init__(image_processor, tokenizer, chat_template=chat_template)
            self.image_token = "<|image_pad|>"
            self.video_token = "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)

    return ImageOnlyQwen2VLProcessor(
        AutoImageProcessor.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    )


def hf_inputs(processor, images: list, text: str):
    """Chat-templated, placeholder-expanded HF model inputs for one user turn with ``images`` then ``text``."""
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    prompt = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )
    return processor(text=[prompt], images=images or None, return_tensors="pt")
