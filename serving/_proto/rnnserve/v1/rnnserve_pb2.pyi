from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class InputInfo(_message.Message):
    __slots__ = ("kind", "name", "features", "vocab", "max_steps")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    features: int
    vocab: _containers.RepeatedScalarFieldContainer[str]
    max_steps: int
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ..., features: _Optional[int] = ..., vocab: _Optional[_Iterable[str]] = ..., max_steps: _Optional[int] = ...) -> None: ...

class OutputInfo(_message.Message):
    __slots__ = ("kind", "size", "activation", "labels", "vocab")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_FIELD_NUMBER: _ClassVar[int]
    kind: str
    size: int
    activation: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    vocab: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., size: _Optional[int] = ..., activation: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., vocab: _Optional[_Iterable[str]] = ...) -> None: ...

class StateInfo(_message.Message):
    __slots__ = ("name", "layers", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    layers: int
    size: int
    def __init__(self, name: _Optional[str] = ..., layers: _Optional[int] = ..., size: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "versions", "task", "description", "input", "output", "state", "streamable", "manifest_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STREAMABLE_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    versions: _containers.RepeatedScalarFieldContainer[int]
    task: str
    description: str
    input: InputInfo
    output: OutputInfo
    state: _containers.RepeatedCompositeFieldContainer[StateInfo]
    streamable: bool
    manifest_json: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., versions: _Optional[_Iterable[int]] = ..., task: _Optional[str] = ..., description: _Optional[str] = ..., input: _Optional[_Union[InputInfo, _Mapping]] = ..., output: _Optional[_Union[OutputInfo, _Mapping]] = ..., state: _Optional[_Iterable[_Union[StateInfo, _Mapping]]] = ..., streamable: bool = ..., manifest_json: _Optional[str] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model", "version", "expires_at", "next_step_index")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    expires_at: float
    next_step_index: int
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., expires_at: _Optional[float] = ..., next_step_index: _Optional[int] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "close")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    close: bool
    def __init__(self, session_id: _Optional[str] = ..., close: bool = ...) -> None: ...

class ExportSessionResponse(_message.Message):
    __slots__ = ("blob", "model", "version", "next_step_index")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    model: str
    version: int
    next_step_index: int
    def __init__(self, blob: _Optional[bytes] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., next_step_index: _Optional[int] = ...) -> None: ...

class ImportSessionRequest(_message.Message):
    __slots__ = ("blob", "session_id", "model", "version")
    BLOB_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    blob: bytes
    session_id: str
    model: str
    version: int
    def __init__(self, blob: _Optional[bytes] = ..., session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ImportSessionResponse(_message.Message):
    __slots__ = ("session_id", "model", "version", "next_step_index", "expires_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model: str
    version: int
    next_step_index: int
    expires_at: float
    def __init__(self, session_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., next_step_index: _Optional[int] = ..., expires_at: _Optional[float] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("values", "steps")
    VALUES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    steps: int
    def __init__(self, values: _Optional[_Iterable[float]] = ..., steps: _Optional[int] = ...) -> None: ...

class Tokens(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("features", "text", "tokens")
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    features: Features
    text: str
    tokens: Tokens
    def __init__(self, features: _Optional[_Union[Features, _Mapping]] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[Tokens, _Mapping]] = ...) -> None: ...

class TokenProb(_message.Message):
    __slots__ = ("char", "index", "p")
    CHAR_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    P_FIELD_NUMBER: _ClassVar[int]
    char: str
    index: int
    p: float
    def __init__(self, char: _Optional[str] = ..., index: _Optional[int] = ..., p: _Optional[float] = ...) -> None: ...

class Output(_message.Message):
    __slots__ = ("raw", "label", "index", "probabilities", "value", "char", "top_k")
    RAW_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CHAR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    raw: _containers.RepeatedScalarFieldContainer[float]
    label: str
    index: int
    probabilities: _containers.RepeatedScalarFieldContainer[float]
    value: _containers.RepeatedScalarFieldContainer[float]
    char: str
    top_k: _containers.RepeatedCompositeFieldContainer[TokenProb]
    def __init__(self, raw: _Optional[_Iterable[float]] = ..., label: _Optional[str] = ..., index: _Optional[int] = ..., probabilities: _Optional[_Iterable[float]] = ..., value: _Optional[_Iterable[float]] = ..., char: _Optional[str] = ..., top_k: _Optional[_Iterable[_Union[TokenProb, _Mapping]]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("session_id", "step_index", "input", "top_k")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_index: int
    input: Input
    top_k: int
    def __init__(self, session_id: _Optional[str] = ..., step_index: _Optional[int] = ..., input: _Optional[_Union[Input, _Mapping]] = ..., top_k: _Optional[int] = ...) -> None: ...

class StepResponse(_message.Message):
    __slots__ = ("session_id", "step_index", "outputs", "text", "expires_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step_index: int
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    text: str
    expires_at: float
    def __init__(self, session_id: _Optional[str] = ..., step_index: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ..., text: _Optional[str] = ..., expires_at: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt", "max_tokens", "temperature", "top_k", "seed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt: Input
    max_tokens: int
    temperature: float
    top_k: int
    seed: int
    def __init__(self, session_id: _Optional[str] = ..., prompt: _Optional[_Union[Input, _Mapping]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("step_index", "text", "token", "value", "output")
    STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    step_index: int
    text: str
    token: int
    value: _containers.RepeatedScalarFieldContainer[float]
    output: Output
    def __init__(self, step_index: _Optional[int] = ..., text: _Optional[str] = ..., token: _Optional[int] = ..., value: _Optional[_Iterable[float]] = ..., output: _Optional[_Union[Output, _Mapping]] = ...) -> None: ...

class StepManyRequest(_message.Message):
    __slots__ = ("steps", "packed")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepRequest]
    packed: PackedSteps
    def __init__(self, steps: _Optional[_Iterable[_Union[StepRequest, _Mapping]]] = ..., packed: _Optional[_Union[PackedSteps, _Mapping]] = ...) -> None: ...

class PackedSteps(_message.Message):
    __slots__ = ("model", "session_ids", "step_indexes", "steps", "features", "tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_IDS_FIELD_NUMBER: _ClassVar[int]
    STEP_INDEXES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_ids: _containers.RepeatedScalarFieldContainer[str]
    step_indexes: _containers.RepeatedScalarFieldContainer[int]
    steps: int
    features: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., session_ids: _Optional[_Iterable[str]] = ..., step_indexes: _Optional[_Iterable[int]] = ..., steps: _Optional[int] = ..., features: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "reason", "message", "expected_step_index", "field")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_STEP_INDEX_FIELD_NUMBER: _ClassVar[int]
    FIELD_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    message: str
    expected_step_index: int
    field: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., expected_step_index: _Optional[int] = ..., field: _Optional[str] = ...) -> None: ...

class StepResult(_message.Message):
    __slots__ = ("session_id", "reply", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    reply: StepResponse
    error: Error
    def __init__(self, session_id: _Optional[str] = ..., reply: _Optional[_Union[StepResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class StepManyResponse(_message.Message):
    __slots__ = ("results", "packed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[StepResult]
    packed: PackedResults
    def __init__(self, results: _Optional[_Iterable[_Union[StepResult, _Mapping]]] = ..., packed: _Optional[_Union[PackedResults, _Mapping]] = ...) -> None: ...

class EntryError(_message.Message):
    __slots__ = ("position", "error")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    position: int
    error: Error
    def __init__(self, position: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class PackedResults(_message.Message):
    __slots__ = ("step_indexes", "raw", "probabilities", "index", "errors", "expires_at")
    STEP_INDEXES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    step_indexes: _containers.RepeatedScalarFieldContainer[int]
    raw: bytes
    probabilities: bytes
    index: _containers.RepeatedScalarFieldContainer[int]
    errors: _containers.RepeatedCompositeFieldContainer[EntryError]
    expires_at: float
    def __init__(self, step_indexes: _Optional[_Iterable[int]] = ..., raw: _Optional[bytes] = ..., probabilities: _Optional[bytes] = ..., index: _Optional[_Iterable[int]] = ..., errors: _Optional[_Iterable[_Union[EntryError, _Mapping]]] = ..., expires_at: _Optional[float] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("model", "version", "inputs", "top_k")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    inputs: _containers.RepeatedCompositeFieldContainer[Input]
    top_k: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., inputs: _Optional[_Iterable[_Union[Input, _Mapping]]] = ..., top_k: _Optional[int] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("model", "version", "outputs")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    outputs: _containers.RepeatedCompositeFieldContainer[Output]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., outputs: _Optional[_Iterable[_Union[Output, _Mapping]]] = ...) -> None: ...
