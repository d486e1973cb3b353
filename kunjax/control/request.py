"""A request's parameters and state: the one object that flows scheduler -> runner -> postprocess."""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Optional, Sequence


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: Optional[int] = None  # None: derived from the request id, so still reproducible per request
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    min_p: float = 0.0  # keep tokens at least min_p x as likely as the most likely one (0: off)
    repetition_penalty: float = 1.0  # transformers' / vLLM's: > 1 discourages prompt and output tokens
    frequency_penalty: float = 0.0  # OpenAI's: logit -= frequency x count in the output so far
    presence_penalty: float = 0.0  # OpenAI's: logit -= presence if the token occurs in the output
    logprobs: Optional[int] = None  # None: off; k: the sampled token's logprob and the k most likely (k <= 5)

    MAX_LOGPROBS = 5

    @property
    def needs_penalty_head(self) -> bool:
        """Penalties, min_p or logprobs: the step runs the head's penalty variant."""
        return (self.min_p > 0 or self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0 or self.logprobs is not None)

    def validate(self) -> None:
        """Raises ValueError naming the offending field."""
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.logprobs is not None and not 0 <= self.logprobs <= self.MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in 0..{self.MAX_LOGPROBS}, got {self.logprobs}")
        if self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"  # EOS, a stop token id or a stop string
    ABORT = "abort"  # cancelled by the client or shut down
    ERROR = "error"


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    SWAPPED = 3  # preempted by a swap: its KV is in host memory, it waits for pages to come back


@dataclasses.dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    pages: list[int] = dataclasses.field(default_factory=list)  # this request's page table
    finish_reason: Optional[FinishReason] = None
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    num_preemptions: int = 0
    seed: int = 0
    scheduled_time: Optional[float] = None  # first admitted into a step (arrival -> this = queue time)
    host_pages: int = 0  # pages of KV held in host memory while SWAPPED

    def __post_init__(self):
        if self.params.seed is not None:
            self.seed = self.params.seed & 0xFFFFFFFF
        else:
            self.seed = hash(self.request_id) & 0x7FFFFFFF

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is not yet computed; 1 in decode, more while (re)prefilling."""
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (before penalties and temperature) and
    the `top` most likely tokens there, as (token id, logprob), most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass
class RequestOutput:
    """What a step (or a whole generation) produced for one request."""

    request_id: str
    new_token_ids: list[int]
    token_ids: list[int]  # all generated so far
    finished: bool
    finish_reason: Optional[str] = None
    text: str = ""  # all text so far (when the engine has a tokenizer)
    text_delta: str = ""
    prompt_tokens: int = 0
    ttft_s: Optional[float] = None
    queue_s: Optional[float] = None  # arrival -> first admitted into a step
    new_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # of new_token_ids (logprobs asked)


def validate_prompt(token_ids: Sequence[int], vocab_size: int) -> None:
    if len(token_ids) == 0:
        raise ValueError("prompt is empty")
    for t in token_ids:
        if not 0 <= int(t) < vocab_size:
            raise ValueError(f"prompt_token_ids: token id {t} outside the vocabulary [0, {vocab_size})")
