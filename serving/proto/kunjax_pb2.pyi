from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_ABORT: FinishReason
FINISH_REASON_ERROR: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "prompt_token_ids", "messages", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    ignore_eos: bool
    min_p: float
    repetition_penalty: float
    frequency_penalty: float
    presence_penalty: float
    logprobs: int
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., ignore_eos: _Optional[bool] = ..., min_p: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., logprobs: _Optional[int] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "logprob", "top")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "ttft_ms", "e2e_ms", "instance", "queue_ms")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    E2E_MS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    e2e_ms: float
    instance: int
    queue_ms: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., e2e_ms: _Optional[float] = ..., instance: _Optional[int] = ..., queue_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "usage", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finish_reason", "usage", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("skip_memory", "events_after")
    SKIP_MEMORY_FIELD_NUMBER: _ClassVar[int]
    EVENTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    skip_memory: bool
    events_after: int
    def __init__(self, skip_memory: _Optional[bool] = ..., events_after: _Optional[int] = ...) -> None: ...

class OverloadEvent(_message.Message):
    __slots__ = ("seq", "time", "kind", "instance", "request_id", "bytes", "tokens", "seconds", "target")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: float
    kind: str
    instance: int
    request_id: str
    bytes: int
    tokens: int
    seconds: float
    target: int
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., instance: _Optional[int] = ..., request_id: _Optional[str] = ..., bytes: _Optional[int] = ..., tokens: _Optional[int] = ..., seconds: _Optional[float] = ..., target: _Optional[int] = ...) -> None: ...

class InstanceStatus(_message.Message):
    __slots__ = ("id", "devices", "tp", "running", "waiting", "pages_total", "pages_free", "pages_used", "page_size", "steps", "preemptions", "group", "layer_start", "layer_stop", "recomputed_tokens", "swap_outs", "swap_ins", "swapped_out_bytes", "swapped_in_bytes", "swapped", "host_swap_bytes", "swap_seconds", "migrations_out", "migrations_in", "migrated_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    TP_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    PAGES_USED_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SWAP_OUTS_FIELD_NUMBER: _ClassVar[int]
    SWAP_INS_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_OUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_IN_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    HOST_SWAP_BYTES_FIELD_NUMBER: _ClassVar[int]
    SWAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_OUT_FIELD_NUMBER: _ClassVar[int]
    MIGRATIONS_IN_FIELD_NUMBER: _ClassVar[int]
    MIGRATED_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: int
    devices: _containers.RepeatedScalarFieldContainer[str]
    tp: int
    running: int
    waiting: int
    pages_total: int
    pages_free: int
    pages_used: int
    page_size: int
    steps: int
    preemptions: int
    group: int
    layer_start: int
    layer_stop: int
    recomputed_tokens: int
    swap_outs: int
    swap_ins: int
    swapped_out_bytes: int
    swapped_in_bytes: int
    swapped: int
    host_swap_bytes: int
    swap_seconds: float
    migrations_out: int
    migrations_in: int
    migrated_bytes: int
    def __init__(self, id: _Optional[int] = ..., devices: _Optional[_Iterable[str]] = ..., tp: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ..., pages_used: _Optional[int] = ..., page_size: _Optional[int] = ..., steps: _Optional[int] = ..., preemptions: _Optional[int] = ..., group: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., recomputed_tokens: _Optional[int] = ..., swap_outs: _Optional[int] = ..., swap_ins: _Optional[int] = ..., swapped_out_bytes: _Optional[int] = ..., swapped_in_bytes: _Optional[int] = ..., swapped: _Optional[int] = ..., host_swap_bytes: _Optional[int] = ..., swap_seconds: _Optional[float] = ..., migrations_out: _Optional[int] = ..., migrations_in: _Optional[int] = ..., migrated_bytes: _Optional[int] = ...) -> None: ...

class StagePlan(_message.Message):
    __slots__ = ("instance", "layer_start", "layer_stop", "embed", "head")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_STOP_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    instance: int
    layer_start: int
    layer_stop: int
    embed: bool
    head: bool
    def __init__(self, instance: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_stop: _Optional[int] = ..., embed: _Optional[bool] = ..., head: _Optional[bool] = ...) -> None: ...

class GroupStatus(_message.Message):
    __slots__ = ("id", "instances", "stages", "state", "num_pages", "running", "waiting", "pages_total", "pages_free")
    ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    id: int
    instances: _containers.RepeatedScalarFieldContainer[int]
    stages: _containers.RepeatedCompositeFieldContainer[StagePlan]
    state: str
    num_pages: int
    running: int
    waiting: int
    pages_total: int
    pages_free: int
    def __init__(self, id: _Optional[int] = ..., instances: _Optional[_Iterable[int]] = ..., stages: _Optional[_Iterable[_Union[StagePlan, _Mapping]]] = ..., state: _Optional[str] = ..., num_pages: _Optional[int] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ...) -> None: ...

class DeviceMemory(_message.Message):
    __slots__ = ("device", "live_bytes", "bytes_in_use", "instance", "budget", "weights", "layers", "embed", "head", "kv", "reserve", "other", "free")
    class LayersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    LIVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_IN_USE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EMBED_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    RESERVE_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    FREE_FIELD_NUMBER: _ClassVar[int]
    device: str
    live_bytes: int
    bytes_in_use: int
    instance: int
    budget: int
    weights: int
    layers: _containers.ScalarMap[int, int]
    embed: int
    head: int
    kv: int
    reserve: int
    other: int
    free: int
    def __init__(self, device: _Optional[str] = ..., live_bytes: _Optional[int] = ..., bytes_in_use: _Optional[int] = ..., instance: _Optional[int] = ..., budget: _Optional[int] = ..., weights: _Optional[int] = ..., layers: _Optional[_Mapping[int, int]] = ..., embed: _Optional[int] = ..., head: _Optional[int] = ..., kv: _Optional[int] = ..., reserve: _Optional[int] = ..., other: _Optional[int] = ..., free: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("model", "instances", "groups", "memory", "running", "waiting", "queued", "pages_total", "pages_free", "compiles", "overload_policy", "max_model_len", "timing", "compiling", "events", "transitions", "in_progress")
    class TimingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TransitionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PAGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PAGES_FREE_FIELD_NUMBER: _ClassVar[int]
    COMPILES_FIELD_NUMBER: _ClassVar[int]
    OVERLOAD_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    COMPILING_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSITIONS_FIELD_NUMBER: _ClassVar[int]
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    model: str
    instances: _containers.RepeatedCompositeFieldContainer[InstanceStatus]
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    memory: _containers.RepeatedCompositeFieldContainer[DeviceMemory]
    running: int
    waiting: int
    queued: int
    pages_total: int
    pages_free: int
    compiles: int
    overload_policy: str
    max_model_len: int
    timing: _containers.ScalarMap[str, float]
    compiling: bool
    events: _containers.RepeatedCompositeFieldContainer[OverloadEvent]
    transitions: _containers.ScalarMap[str, float]
    in_progress: _containers.RepeatedCompositeFieldContainer[TransitionProgress]
    def __init__(self, model: _Optional[str] = ..., instances: _Optional[_Iterable[_Union[InstanceStatus, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ..., memory: _Optional[_Iterable[_Union[DeviceMemory, _Mapping]]] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., queued: _Optional[int] = ..., pages_total: _Optional[int] = ..., pages_free: _Optional[int] = ..., compiles: _Optional[int] = ..., overload_policy: _Optional[str] = ..., max_model_len: _Optional[int] = ..., timing: _Optional[_Mapping[str, float]] = ..., compiling: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[OverloadEvent, _Mapping]]] = ..., transitions: _Optional[_Mapping[str, float]] = ..., in_progress: _Optional[_Iterable[_Union[TransitionProgress, _Mapping]]] = ...) -> None: ...

class TransitionProgress(_message.Message):
    __slots__ = ("kind", "groups", "pieces", "seconds")
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    groups: _containers.RepeatedScalarFieldContainer[int]
    pieces: int
    seconds: float
    def __init__(self, kind: _Optional[str] = ..., groups: _Optional[_Iterable[int]] = ..., pieces: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class PlanDropRequest(_message.Message):
    __slots__ = ("group_size",)
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    group_size: int
    def __init__(self, group_size: _Optional[int] = ...) -> None: ...

class GroupPlan(_message.Message):
    __slots__ = ("instances", "stages", "num_pages", "pages_before", "pages_gained", "peak_bytes", "steady_bytes", "budget_bytes")
    class PagesBeforeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class PagesGainedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class PeakBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class SteadyBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    class BudgetBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_PAGES_FIELD_NUMBER: _ClassVar[int]
    PAGES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PAGES_GAINED_FIELD_NUMBER: _ClassVar[int]
    PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEADY_BYTES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedScalarFieldContainer[int]
    stages: _containers.RepeatedCompositeFieldContainer[StagePlan]
    num_pages: int
    pages_before: _containers.ScalarMap[int, int]
    pages_gained: _containers.ScalarMap[int, int]
    peak_bytes: _containers.ScalarMap[int, int]
    steady_bytes: _containers.ScalarMap[int, int]
    budget_bytes: _containers.ScalarMap[int, int]
    def __init__(self, instances: _Optional[_Iterable[int]] = ..., stages: _Optional[_Iterable[_Union[StagePlan, _Mapping]]] = ..., num_pages: _Optional[int] = ..., pages_before: _Optional[_Mapping[int, int]] = ..., pages_gained: _Optional[_Mapping[int, int]] = ..., peak_bytes: _Optional[_Mapping[int, int]] = ..., steady_bytes: _Optional[_Mapping[int, int]] = ..., budget_bytes: _Optional[_Mapping[int, int]] = ...) -> None: ...

class PlanDropResponse(_message.Message):
    __slots__ = ("groups", "alone", "executables_ready", "executables_total")
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    ALONE_FIELD_NUMBER: _ClassVar[int]
    EXECUTABLES_READY_FIELD_NUMBER: _ClassVar[int]
    EXECUTABLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    groups: _containers.RepeatedCompositeFieldContainer[GroupPlan]
    alone: _containers.RepeatedScalarFieldContainer[int]
    executables_ready: int
    executables_total: int
    def __init__(self, groups: _Optional[_Iterable[_Union[GroupPlan, _Mapping]]] = ..., alone: _Optional[_Iterable[int]] = ..., executables_ready: _Optional[int] = ..., executables_total: _Optional[int] = ...) -> None: ...

class DropRequest(_message.Message):
    __slots__ = ("group_size",)
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    group_size: int
    def __init__(self, group_size: _Optional[int] = ...) -> None: ...

class TransitionReport(_message.Message):
    __slots__ = ("kind", "groups", "seconds", "freed_weight_bytes", "exchange_bytes_between_devices", "exchange_bytes_local", "exchange_seconds", "live_before", "peak_live", "live_after", "compiles", "failed_requests", "pieces", "piece_seconds_max", "piece_seconds_total", "exchange_bytes_padding", "state")
    class FreedWeightBytesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LiveBeforeEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class PeakLiveEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LiveAfterEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    KIND_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    FREED_WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_BYTES_BETWEEN_DEVICES_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_BYTES_LOCAL_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LIVE_BEFORE_FIELD_NUMBER: _ClassVar[int]
    PEAK_LIVE_FIELD_NUMBER: _ClassVar[int]
    LIVE_AFTER_FIELD_NUMBER: _ClassVar[int]
    COMPILES_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    PIECES_FIELD_NUMBER: _ClassVar[int]
    PIECE_SECONDS_MAX_FIELD_NUMBER: _ClassVar[int]
    PIECE_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    EXCHANGE_BYTES_PADDING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    groups: _containers.RepeatedScalarFieldContainer[int]
    seconds: float
    freed_weight_bytes: _containers.ScalarMap[str, int]
    exchange_bytes_between_devices: int
    exchange_bytes_local: int
    exchange_seconds: float
    live_before: _containers.ScalarMap[str, int]
    peak_live: _containers.ScalarMap[str, int]
    live_after: _containers.ScalarMap[str, int]
    compiles: int
    failed_requests: int
    pieces: int
    piece_seconds_max: float
    piece_seconds_total: float
    exchange_bytes_padding: int
    state: str
    def __init__(self, kind: _Optional[str] = ..., groups: _Optional[_Iterable[int]] = ..., seconds: _Optional[float] = ..., freed_weight_bytes: _Optional[_Mapping[str, int]] = ..., exchange_bytes_between_devices: _Optional[int] = ..., exchange_bytes_local: _Optional[int] = ..., exchange_seconds: _Optional[float] = ..., live_before: _Optional[_Mapping[str, int]] = ..., peak_live: _Optional[_Mapping[str, int]] = ..., live_after: _Optional[_Mapping[str, int]] = ..., compiles: _Optional[int] = ..., failed_requests: _Optional[int] = ..., pieces: _Optional[int] = ..., piece_seconds_max: _Optional[float] = ..., piece_seconds_total: _Optional[float] = ..., exchange_bytes_padding: _Optional[int] = ..., state: _Optional[str] = ...) -> None: ...

class DropResponse(_message.Message):
    __slots__ = ("plan", "report", "groups")
    PLAN_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    plan: PlanDropResponse
    report: TransitionReport
    groups: _containers.RepeatedCompositeFieldContainer[GroupStatus]
    def __init__(self, plan: _Optional[_Union[PlanDropResponse, _Mapping]] = ..., report: _Optional[_Union[TransitionReport, _Mapping]] = ..., groups: _Optional[_Iterable[_Union[GroupStatus, _Mapping]]] = ...) -> None: ...

class RestoreRequest(_message.Message):
    __slots__ = ("group_ids",)
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    group_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, group_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[TransitionReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[TransitionReport, _Mapping]]] = ...) -> None: ...
