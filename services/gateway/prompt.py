"""Chat messages → prompt token ids with image placeholders expanded (gateway side).

The chat template is the model's own (``tokenizer.apply_chat_template``); every image part
renders as one ``<|image_pad|>`` which is then repeated ``num_tokens`` times, the count the
image processor will produce for that image size (``ImageGeometry``, Qwen2-VL's
``smart_resize``) — so the gateway tokenizes without touching pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from epd.models.geometry import ImageGeometry
from services.gateway.media import ImageInput, MediaError, load_image_url
from services.gateway.protocol import ApiError, ChatMessage


@dataclass
class PlannedImage:
    """An image with its placeholder geometry."""

    image: ImageInput
    index: int
    num_tokens: int
    grid_thw: tuple[int, int, int]


@dataclass
class Prompt:
    token_ids: list[int]
    images: list[PlannedImage]


class PromptBuilder:
    """Tokenizes chat requests for one model directory.

    Args:
        model_dir: HF model directory (tokenizer with chat template, config.json,
            preprocessor config).
    """

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.geometry = ImageGeometry.from_model_dir(model_dir)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.image_token_id = int(cfg["image_token_id"])
        text_cfg = cfg.get("text_config", cfg)
        self.max_model_len = int(text_cfg.get("max_position_embeddings", cfg.get("max_position_embeddings", 0)))

    def build(self, messages: list[ChatMessage], max_images: int, max_pixels: int) -> Prompt:
        """Apply the chat template and expand placeholders.

        Raises:
            ApiError: 400 on bad media or too many images.
        """
        hf_messages, images = [], []
        for m_i, msg in enumerate(messages):
            if msg.content is None or isinstance(msg.content, str):
                hf_messages.append({"role": msg.role, "content": msg.content or ""})
                continue
            parts = []
            for p_i, part in enumerate(msg.content):
                param = f"messages[{m_i}].content[{p_i}]"
                if part.type == "text":
                    parts.append({"type": "text", "text": part.text or ""})
                    continue
                if part.image_url is None:
                    raise ApiError(400, "image_url part without image_url", param=param)
                if len(images) >= max_images:
                    raise ApiError(400, f"at most {max_images} images per request", param=param)
                try:
                    images.append(load_image_url(part.image_url.url, max_pixels))
                except MediaError as exc:
                    raise ApiError(400, str(exc), param=f"{param}.image_url") from None
                parts.append({"type": "image"})
            hf_messages.append({"role": msg.role, "content": parts})
        text = self.tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._expand(ids, images)

    def _expand(self, ids: list[int], images: list[ImageInput]) -> Prompt:
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != len(images):
            raise ApiError(400, f"prompt has {len(positions)} image placeholders for {len(images)} images")
        out: list[int] = []
        planned: list[PlannedImage] = []
        prev = 0
        for index, (pos, image) in enumerate(zip(positions, images, strict=True)):
            n, grid = self.geometry.num_image_tokens(image.width, image.height)
            out.extend(ids[prev:pos])
            out.extend([self.image_token_id] * n)
            prev = pos + 1
            planned.append(PlannedImage(image, index, n, tuple(grid)))
        out.extend(ids[prev:])
        return Prompt(out, planned)
