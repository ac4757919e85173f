"""Requests → prompt token ids with image placeholders expanded (gateway side).

The chat template is the model's own (``tokenizer.apply_chat_template``); every image part
renders as one ``<|image_pad|>`` which is then repeated ``num_tokens`` times, the count the
image processor will produce for that image size (``ImageGeometry``, Qwen2-VL's
``smart_resize``) — so the gateway tokenizes without touching pixels.

Images are resolved in two steps so that fetching can be asynchronous: :func:`image_urls`
lists (and counts) the request's ``image_url`` parts, the caller fetches them as
:class:`ImageInput` (the HTTP layer's :class:`services.gateway.media.MediaFetcher`), then
:meth:`PromptBuilder.build` templates and tokenizes with the fetched images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer

from epd.models.geometry import ImageGeometry
from services.gateway.protocol import ApiError, ChatMessage

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ImageInput:
    """One image of a request.

    Attributes:
        data: the encoded file exactly as the client sent it.
        mm_hash: sha256 hex digest of ``data``.
        width, height: pixels, from the header.
    """

    data: bytes
    mm_hash: str
    width: int
    height: int


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


def image_urls(messages: list[ChatMessage], max_images: int) -> list[tuple[str, str]]:
    """``(param path, url)`` of every image part, in prompt order.

    Raises:
        ApiError: 400 for an image part without ``image_url`` or more than ``max_images`` images.
    """
    out = []
    for m_i, msg in enumerate(messages):
        if msg.content is None or isinstance(msg.content, str):
            continue
        for p_i, part in enumerate(msg.content):
            if part.type != "image_url":
                continue
            param = f"messages[{m_i}].content[{p_i}].image_url"
            if part.image_url is None:
                raise ApiError(400, "image_url part without image_url", param=param)
            if len(out) >= max_images:
                raise ApiError(400, f"at most {max_images} images per request (EPD_MAX_IMAGES_PER_REQUEST)",
                               param=param)
            out.append((param, part.image_url.url))
    return out


class PromptBuilder:
    """Tokenizes requests for one model directory.

    Args:
        model_dir: HF model directory (tokenizer with chat template, config.json,
            preprocessor config).

    Attributes:
        max_model_len: context length (``max_position_embeddings``).
        hidden_size, num_layers, num_kv_heads, head_dim: LLM dimensions (derived byte counts).
    """

    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.geometry = ImageGeometry.from_model_dir(model_dir)
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        self.image_token_id = int(cfg["image_token_id"])
        self.special_media_ids = {int(cfg[k]) for k in ("image_token_id", "video_token_id") if k in cfg}
        text_cfg = cfg.get("text_config", cfg)
        self.max_model_len = int(text_cfg.get("max_position_embeddings", cfg.get("max_position_embeddings", 0)))
        self.vocab_size = int(text_cfg.get("vocab_size", len(self.tokenizer)))
        self.hidden_size = int(text_cfg["hidden_size"])
        self.num_layers = int(text_cfg["num_hidden_layers"])
        heads = int(text_cfg["num_attention_heads"])
        self.num_kv_heads = int(text_cfg.get("num_key_value_heads", heads))
        self.head_dim = int(text_cfg.get("head_dim") or self.hidden_size // heads)
        # Every token decodes to at most this many characters (byte-level BPE: one character per
        # byte of its piece), so a text longer than max_model_len x this cannot fit the context.
        self.max_token_chars = max(len(piece) for piece in self.tokenizer.get_vocab())

    def kv_bytes_per_token(self, dtype: str) -> int:
        """Bytes of K and V of one token over every layer (``[layers, 2, kv_heads, head_dim]``)."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * _DTYPE_BYTES[dtype]

    def feature_bytes(self, num_tokens: int, dtype: str) -> int:
        """Bytes of one image's features ``[num_tokens, hidden]``."""
        return num_tokens * self.hidden_size * _DTYPE_BYTES[dtype]

    def check_text_length(self, chars: int, param: str) -> None:
        """Reject, before tokenizing, a text of ``chars`` characters that cannot fit the context.

        A bound, not a count: it only rejects texts that need more than ``max_model_len`` tokens
        whatever their content, so a body at EPD_MAX_BODY_MB is refused in milliseconds instead
        of being tokenized for minutes.

        Raises:
            ApiError: 400 naming ``param``.
        """
        if self.max_model_len and chars > self.max_model_len * self.max_token_chars:
            raise ApiError(400, f"This model's maximum context length is {self.max_model_len} tokens; a prompt of "
                                f"{chars} characters needs more (at most {self.max_token_chars} characters per token).",
                           param=param)

    def build(self, messages: list[ChatMessage], images: list[ImageInput]) -> Prompt:
        """Apply the chat template and expand placeholders; ``images`` in :func:`image_urls` order.

        Raises:
            ApiError: 400 when an image's size is unusable (aspect ratio over 200).
        """
        self.check_text_length(sum(len(msg.content) if isinstance(msg.content, str) else
                                   sum(len(p.text or "") for p in msg.content or []) for msg in messages), "messages")
        hf_messages = []
        for msg in messages:
            if msg.content is None or isinstance(msg.content, str):
                hf_messages.append({"role": msg.role, "content": msg.content or ""})
                continue
            parts = [{"type": "text", "text": p.text or ""} if p.type == "text" else {"type": "image"}
                     for p in msg.content]
            hf_messages.append({"role": msg.role, "content": parts})
        text = self.tokenizer.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._expand(ids, images)

    def build_text(self, prompt: str | list[int]) -> Prompt:
        """A text-completion prompt: a string (tokenized as is) or token ids (checked).

        Raises:
            ApiError: 400 for an empty prompt, an id outside the vocabulary or an image placeholder id.
        """
        if isinstance(prompt, str):
            self.check_text_length(len(prompt), "prompt")
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size or t in self.special_media_ids]
            if bad:
                raise ApiError(400, f"prompt token id {bad[0]} is out of range or a media placeholder",
                               param="prompt")
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "prompt is empty", param="prompt")
        return Prompt(ids, [])

    def _expand(self, ids: list[int], images: list[ImageInput]) -> Prompt:
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != len(images):
            raise ApiError(400, f"prompt has {len(positions)} image placeholders for {len(images)} images")
        out: list[int] = []
        planned: list[PlannedImage] = []
        prev = 0
        for index, (pos, image) in enumerate(zip(positions, images, strict=True)):
            try:
                n, grid = self.geometry.num_image_tokens(image.width, image.height)
            except ValueError as exc:
                raise ApiError(400, f"image {index}: {exc}", param="messages") from None
            out.extend(ids[prev:pos])
            out.extend([self.image_token_id] * n)
            prev = pos + 1
            planned.append(PlannedImage(image, index, n, tuple(grid)))
        out.extend(ids[prev:])
        return Prompt(out, planned)
