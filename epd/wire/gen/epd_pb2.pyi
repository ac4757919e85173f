from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_UNSPECIFIED: _ClassVar[ErrorCode]
    INVALID_REQUEST: _ClassVar[ErrorCode]
    UNAVAILABLE: _ClassVar[ErrorCode]
    TIMEOUT: _ClassVar[ErrorCode]
    INTERNAL: _ClassVar[ErrorCode]
    OUT_OF_CAPACITY: _ClassVar[ErrorCode]
ERROR_UNSPECIFIED: ErrorCode
INVALID_REQUEST: ErrorCode
UNAVAILABLE: ErrorCode
TIMEOUT: ErrorCode
INTERNAL: ErrorCode
OUT_OF_CAPACITY: ErrorCode

class TensorRef(_message.Message):
    __slots__ = ("session", "offset", "nbytes", "dtype", "shape")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    session: str
    offset: int
    nbytes: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, session: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class ImageItem(_message.Message):
    __slots__ = ("mm_hash", "index", "width", "height", "num_tokens", "grid_thw", "blob_index")
    MM_HASH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    BLOB_INDEX_FIELD_NUMBER: _ClassVar[int]
    mm_hash: str
    index: int
    width: int
    height: int
    num_tokens: int
    grid_thw: _containers.RepeatedScalarFieldContainer[int]
    blob_index: int
    def __init__(self, mm_hash: _Optional[str] = ..., index: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., num_tokens: _Optional[int] = ..., grid_thw: _Optional[_Iterable[int]] = ..., blob_index: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "has_seed", "seed", "stop_token_ids", "ignore_eos")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    has_seed: bool
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., has_seed: _Optional[bool] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("request_id", "images", "prefill_instance", "prefill_inbox", "reply_to")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_INBOX_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    images: _containers.RepeatedCompositeFieldContainer[ImageItem]
    prefill_instance: str
    prefill_inbox: str
    reply_to: str
    def __init__(self, request_id: _Optional[str] = ..., images: _Optional[_Iterable[_Union[ImageItem, _Mapping]]] = ..., prefill_instance: _Optional[str] = ..., prefill_inbox: _Optional[str] = ..., reply_to: _Optional[str] = ...) -> None: ...

class FeaturesReady(_message.Message):
    __slots__ = ("request_id", "mm_hash", "index", "features", "grid_thw", "encoder_instance")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MM_HASH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    GRID_THW_FIELD_NUMBER: _ClassVar[int]
    ENCODER_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    mm_hash: str
    index: int
    features: TensorRef
    grid_thw: _containers.RepeatedScalarFieldContainer[int]
    encoder_instance: str
    def __init__(self, request_id: _Optional[str] = ..., mm_hash: _Optional[str] = ..., index: _Optional[int] = ..., features: _Optional[_Union[TensorRef, _Mapping]] = ..., grid_thw: _Optional[_Iterable[int]] = ..., encoder_instance: _Optional[str] = ...) -> None: ...

class PrefillRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "images", "sampling", "decode_instance", "decode_inbox", "reply_to", "arrival_time", "deadline")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    DECODE_INBOX_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_TIME_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageItem]
    sampling: SamplingParams
    decode_instance: str
    decode_inbox: str
    reply_to: str
    arrival_time: float
    deadline: float
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., images: _Optional[_Iterable[_Union[ImageItem, _Mapping]]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., decode_instance: _Optional[str] = ..., decode_inbox: _Optional[str] = ..., reply_to: _Optional[str] = ..., arrival_time: _Optional[float] = ..., deadline: _Optional[float] = ...) -> None: ...

class KvAllocRequest(_message.Message):
    __slots__ = ("request_id", "num_tokens", "max_new_tokens", "reply_to")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_tokens: int
    max_new_tokens: int
    reply_to: str
    def __init__(self, request_id: _Optional[str] = ..., num_tokens: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., reply_to: _Optional[str] = ...) -> None: ...

class KvLayout(_message.Message):
    __slots__ = ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim", "dtype")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    def __init__(self, num_layers: _Optional[int] = ..., num_blocks: _Optional[int] = ..., block_size: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[str] = ...) -> None: ...

class KvAllocated(_message.Message):
    __slots__ = ("request_id", "session", "layout", "block_ids", "decode_instance")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    session: str
    layout: KvLayout
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    decode_instance: str
    def __init__(self, request_id: _Optional[str] = ..., session: _Optional[str] = ..., layout: _Optional[_Union[KvLayout, _Mapping]] = ..., block_ids: _Optional[_Iterable[int]] = ..., decode_instance: _Optional[str] = ...) -> None: ...

class KvReady(_message.Message):
    __slots__ = ("request_id", "num_prompt_tokens", "first_token_id", "rope_delta", "sampling", "reply_to", "deadline")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    ROPE_DELTA_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    num_prompt_tokens: int
    first_token_id: int
    rope_delta: int
    sampling: SamplingParams
    reply_to: str
    deadline: float
    def __init__(self, request_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., first_token_id: _Optional[int] = ..., rope_delta: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., reply_to: _Optional[str] = ..., deadline: _Optional[float] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("request_id", "token_ids", "finished", "finish_reason", "num_prompt_tokens", "stage", "offset")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    num_prompt_tokens: int
    stage: str
    offset: int
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., stage: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class RequestFailed(_message.Message):
    __slots__ = ("request_id", "code", "message", "stage", "peer")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    code: ErrorCode
    message: str
    stage: str
    peer: str
    def __init__(self, request_id: _Optional[str] = ..., code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ..., stage: _Optional[str] = ..., peer: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_id", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("request_id", "sender", "encode_request", "features_ready", "prefill_request", "kv_alloc_request", "kv_allocated", "kv_ready", "token_delta", "request_failed", "abort_request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ENCODE_REQUEST_FIELD_NUMBER: _ClassVar[int]
    FEATURES_READY_FIELD_NUMBER: _ClassVar[int]
    PREFILL_REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_ALLOC_REQUEST_FIELD_NUMBER: _ClassVar[int]
    KV_ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    KV_READY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DELTA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FAILED_FIELD_NUMBER: _ClassVar[int]
    ABORT_REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sender: str
    encode_request: EncodeRequest
    features_ready: FeaturesReady
    prefill_request: PrefillRequest
    kv_alloc_request: KvAllocRequest
    kv_allocated: KvAllocated
    kv_ready: KvReady
    token_delta: TokenDelta
    request_failed: RequestFailed
    abort_request: AbortRequest
    def __init__(self, request_id: _Optional[str] = ..., sender: _Optional[str] = ..., encode_request: _Optional[_Union[EncodeRequest, _Mapping]] = ..., features_ready: _Optional[_Union[FeaturesReady, _Mapping]] = ..., prefill_request: _Optional[_Union[PrefillRequest, _Mapping]] = ..., kv_alloc_request: _Optional[_Union[KvAllocRequest, _Mapping]] = ..., kv_allocated: _Optional[_Union[KvAllocated, _Mapping]] = ..., kv_ready: _Optional[_Union[KvReady, _Mapping]] = ..., token_delta: _Optional[_Union[TokenDelta, _Mapping]] = ..., request_failed: _Optional[_Union[RequestFailed, _Mapping]] = ..., abort_request: _Optional[_Union[AbortRequest, _Mapping]] = ...) -> None: ...
