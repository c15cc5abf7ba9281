"""The API's enums and the library's names for them, one table each way, shared by the servicer
(which reads requests and writes replies) and the client (which does the inverse)."""

from __future__ import annotations

from sharedllm.common.generated.sharedllm.v1 import decoder_pb2 as pb

GROUNDINGS = {"quote": pb.GROUNDING_QUOTE, "facts": pb.GROUNDING_FACTS, "off": pb.GROUNDING_OFF}
GROUNDING_NAMES = {value: name for name, value in GROUNDINGS.items()}
FINISH_REASONS = {
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "repetition": pb.FINISH_REASON_REPETITION,
}
FINISH_REASON_NAMES = {value: name for name, value in FINISH_REASONS.items()}
