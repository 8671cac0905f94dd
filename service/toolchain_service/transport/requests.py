"""Caller input, validated once, at the edge: a proto `StageRequest` becomes a `StageSpec`.

Every invalid field becomes one BadRequest field violation, all reported together.
Names that must exist (backend, model, tools) are checked by the runner, which knows
what exists, and fail with NOT_FOUND listing the available names.
"""

from __future__ import annotations

import math
import uuid

from toolchain_proto.v1 import toolchain_pb2 as pb

from toolchain_service.config import PhaseDefaults, Settings
from toolchain_service.errors import FieldViolation, InvalidRequest
from toolchain_service.events import PhaseOptions, StageSpec, ToolChoice
from toolchain_service.transport.decoding import Undecodable

MAX_ID_CHARS = 128
MAX_NAME_CHARS = 256
MAX_TOOLS = 128


def _phase(
    options: pb.PhaseOptions, defaults: PhaseDefaults, ceiling: int, path: str, bad: list[FieldViolation]
) -> PhaseOptions:
    max_tokens = defaults.max_tokens
    if options.HasField("max_tokens"):
        max_tokens = options.max_tokens
        if not 1 <= max_tokens <= ceiling:
            bad.append(
                FieldViolation(f"{path}.max_tokens", f"must be between 1 and {ceiling}, got {max_tokens}")
            )
    temperature = defaults.temperature
    if options.HasField("temperature"):
        temperature = options.temperature
        if not math.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
            bad.append(
                FieldViolation(f"{path}.temperature", f"must be between 0.0 and 2.0, got {temperature}")
            )
    return PhaseOptions(max_tokens=max_tokens, temperature=temperature)


_MODES = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: "auto",
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
    pb.TOOL_CHOICE_MODE_NONE: "none",
}


def _tool_choice(choice: pb.ToolChoice, bad: list[FieldViolation]) -> ToolChoice:
    which = choice.WhichOneof("choice")
    if which == "tool":
        if not choice.tool or len(choice.tool) > MAX_NAME_CHARS:
            bad.append(FieldViolation("stage.tool_choice.tool", "must be a tool name (see ListTools)"))
        return ToolChoice("tool", choice.tool)
    if which is None:
        bad.append(FieldViolation("stage.tool_choice", "set mode or tool, or leave tool_choice unset"))
        return ToolChoice()
    mode = _MODES.get(choice.mode)  # the oneof's only other member
    if mode is None:
        bad.append(FieldViolation("stage.tool_choice.mode", f"unknown mode {choice.mode}"))
        return ToolChoice()
    return ToolChoice(mode)


def _valid_stage_id(stage_id: str) -> bool:
    return len(stage_id) <= MAX_ID_CHARS and all(" " < c < "\x7f" for c in stage_id)


def rejected_stage_id(request: pb.StageRequest | Undecodable) -> str:
    """The stage id a rejected stream's error event echoes: the caller's when it is a valid
    one, else a new UUID (the contract promises a non-empty id in every event)."""
    if isinstance(request, pb.StageRequest) and request.stage_id and _valid_stage_id(request.stage_id):
        return request.stage_id
    return str(uuid.uuid4())


def parse_stage(request: pb.StageRequest, settings: Settings, *, synthesis: bool, stream: bool) -> StageSpec:
    """The validated stage, or InvalidRequest naming every bad field."""
    bad: list[FieldViolation] = []
    stage_id = request.stage_id
    if not _valid_stage_id(stage_id):
        bad.append(
            FieldViolation("stage.stage_id", f"must be at most {MAX_ID_CHARS} printable ASCII characters")
        )
    limit = settings.max_prompt_chars
    if not request.user_prompt.strip():
        bad.append(FieldViolation("stage.user_prompt", "is required"))
    elif len(request.user_prompt) > limit:
        bad.append(
            FieldViolation("stage.user_prompt", f"is {len(request.user_prompt)} characters; at most {limit}")
        )
    if len(request.system_prompt) > limit:
        bad.append(
            FieldViolation(
                "stage.system_prompt", f"is {len(request.system_prompt)} characters; at most {limit}"
            )
        )
    for name in ("backend", "model"):
        if len(getattr(request, name)) > MAX_NAME_CHARS:
            bad.append(FieldViolation(f"stage.{name}", f"must be at most {MAX_NAME_CHARS} characters"))
    if len(request.tools) > MAX_TOOLS:
        bad.append(FieldViolation("stage.tools", f"at most {MAX_TOOLS} names"))
    for position, name in enumerate(request.tools):
        if not name or len(name) > MAX_NAME_CHARS:
            bad.append(FieldViolation(f"stage.tools[{position}]", "must be a tool name (see ListTools)"))
    ceiling = settings.max_tokens_ceiling
    tool_phase = _phase(request.tool_phase, settings.tool_phase, ceiling, "stage.tool_phase", bad)
    synthesis_phase = _phase(
        request.synthesis_phase, settings.synthesis_phase, ceiling, "stage.synthesis_phase", bad
    )
    max_rounds = settings.default_rounds
    if request.HasField("max_rounds"):
        max_rounds = request.max_rounds
        if not 1 <= max_rounds <= settings.max_rounds:
            bad.append(FieldViolation("stage.max_rounds", f"must be 1 to {settings.max_rounds}"))
    tool_choice = _tool_choice(request.tool_choice, bad) if request.HasField("tool_choice") else ToolChoice()
    if bad:
        raise InvalidRequest(bad)
    return StageSpec(
        stage_id=stage_id or str(uuid.uuid4()),
        system_prompt=request.system_prompt,
        user_prompt=request.user_prompt,
        backend=request.backend,
        model=request.model,
        tool_phase=tool_phase,
        synthesis_phase=synthesis_phase,
        tools=tuple(request.tools),
        synthesis=synthesis,
        stream=stream,
        max_rounds=max_rounds,
        tool_choice=tool_choice,
        repair=request.repair_invalid_calls,
    )
