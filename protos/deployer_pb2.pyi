from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STREAM_UNSPECIFIED: _ClassVar[Stream]
    STDOUT: _ClassVar[Stream]
    STDERR: _ClassVar[Stream]

class Outcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OUTCOME_UNSPECIFIED: _ClassVar[Outcome]
    EXITED: _ClassVar[Outcome]
    SIGNALED: _ClassVar[Outcome]
    TIMED_OUT: _ClassVar[Outcome]
    CANCELLED: _ClassVar[Outcome]
    FAILED_TO_START: _ClassVar[Outcome]
    INTERRUPTED: _ClassVar[Outcome]
    LOST: _ClassVar[Outcome]
    REJECTED: _ClassVar[Outcome]

class HeldState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HELD_UNSPECIFIED: _ClassVar[HeldState]
    HELD_RUNNING: _ClassVar[HeldState]
    HELD_FINISHED: _ClassVar[HeldState]

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_CONNECTED: _ClassVar[AgentState]
    AGENT_DISCONNECTED: _ClassVar[AgentState]
    AGENT_LOST: _ClassVar[AgentState]
STREAM_UNSPECIFIED: Stream
STDOUT: Stream
STDERR: Stream
OUTCOME_UNSPECIFIED: Outcome
EXITED: Outcome
SIGNALED: Outcome
TIMED_OUT: Outcome
CANCELLED: Outcome
FAILED_TO_START: Outcome
INTERRUPTED: Outcome
LOST: Outcome
REJECTED: Outcome
HELD_UNSPECIFIED: HeldState
HELD_RUNNING: HeldState
HELD_FINISHED: HeldState
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_CONNECTED: AgentState
AGENT_DISCONNECTED: AgentState
AGENT_LOST: AgentState

class ExecSpec(_message.Message):
    __slots__ = ("argv", "env", "cwd", "stdin", "timeout_s", "user", "kill_grace_s", "env_file", "limits")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARGV_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    STDIN_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    KILL_GRACE_S_FIELD_NUMBER: _ClassVar[int]
    ENV_FILE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    argv: _containers.RepeatedScalarFieldContainer[str]
    env: _containers.ScalarMap[str, str]
    cwd: str
    stdin: bytes
    timeout_s: float
    user: str
    kill_grace_s: float
    env_file: str
    limits: Limits
    def __init__(self, argv: _Optional[_Iterable[str]] = ..., env: _Optional[_Mapping[str, str]] = ..., cwd: _Optional[str] = ..., stdin: _Optional[bytes] = ..., timeout_s: _Optional[float] = ..., user: _Optional[str] = ..., kill_grace_s: _Optional[float] = ..., env_file: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("group", "memory_bytes", "cpu", "processes", "tmp_dir")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_FIELD_NUMBER: _ClassVar[int]
    TMP_DIR_FIELD_NUMBER: _ClassVar[int]
    group: str
    memory_bytes: int
    cpu: float
    processes: int
    tmp_dir: str
    def __init__(self, group: _Optional[str] = ..., memory_bytes: _Optional[int] = ..., cpu: _Optional[float] = ..., processes: _Optional[int] = ..., tmp_dir: _Optional[str] = ...) -> None: ...

class WriteFileSpec(_message.Message):
    __slots__ = ("path", "content", "mode", "owner")
    PATH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    path: str
    content: bytes
    mode: int
    owner: str
    def __init__(self, path: _Optional[str] = ..., content: _Optional[bytes] = ..., mode: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class ServiceStartSpec(_message.Message):
    __slots__ = ("name", "instance", "argv", "cwd", "env", "env_file", "user", "log_path", "limits", "log_dir", "log_file_bytes", "log_keep_bytes")
    class EnvEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    CWD_FIELD_NUMBER: _ClassVar[int]
    ENV_FIELD_NUMBER: _ClassVar[int]
    ENV_FILE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    LOG_PATH_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LOG_DIR_FIELD_NUMBER: _ClassVar[int]
    LOG_FILE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOG_KEEP_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    cwd: str
    env: _containers.ScalarMap[str, str]
    env_file: str
    user: str
    log_path: str
    limits: Limits
    log_dir: str
    log_file_bytes: int
    log_keep_bytes: int
    def __init__(self, name: _Optional[str] = ..., instance: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., cwd: _Optional[str] = ..., env: _Optional[_Mapping[str, str]] = ..., env_file: _Optional[str] = ..., user: _Optional[str] = ..., log_path: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., log_dir: _Optional[str] = ..., log_file_bytes: _Optional[int] = ..., log_keep_bytes: _Optional[int] = ...) -> None: ...

class LogReadSpec(_message.Message):
    __slots__ = ("logs", "instance", "since", "until", "tail", "follow", "timestamps")
    LOGS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    logs: str
    instance: str
    since: str
    until: str
    tail: int
    follow: bool
    timestamps: bool
    def __init__(self, logs: _Optional[str] = ..., instance: _Optional[str] = ..., since: _Optional[str] = ..., until: _Optional[str] = ..., tail: _Optional[int] = ..., follow: _Optional[bool] = ..., timestamps: _Optional[bool] = ...) -> None: ...

class ReleaseSealSpec(_message.Message):
    __slots__ = ("release", "store", "user", "prune", "writable")
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    WRITABLE_FIELD_NUMBER: _ClassVar[int]
    release: str
    store: str
    user: str
    prune: bool
    writable: _containers.RepeatedCompositeFieldContainer[WritablePath]
    def __init__(self, release: _Optional[str] = ..., store: _Optional[str] = ..., user: _Optional[str] = ..., prune: _Optional[bool] = ..., writable: _Optional[_Iterable[_Union[WritablePath, _Mapping]]] = ...) -> None: ...

class WritablePath(_message.Message):
    __slots__ = ("path", "target")
    PATH_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    path: str
    target: str
    def __init__(self, path: _Optional[str] = ..., target: _Optional[str] = ...) -> None: ...

class ServiceStopSpec(_message.Message):
    __slots__ = ("name", "instance", "grace_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    GRACE_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance: str
    grace_s: float
    def __init__(self, name: _Optional[str] = ..., instance: _Optional[str] = ..., grace_s: _Optional[float] = ...) -> None: ...

class ServiceListSpec(_message.Message):
    __slots__ = ("name_prefix", "group")
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    name_prefix: str
    group: str
    def __init__(self, name_prefix: _Optional[str] = ..., group: _Optional[str] = ...) -> None: ...

class HttpProbeSpec(_message.Message):
    __slots__ = ("url", "expect_status", "attempts", "interval_s", "timeout_s", "host_header", "service_name", "service_instance", "expect_statuses", "deadline_s")
    URL_FIELD_NUMBER: _ClassVar[int]
    EXPECT_STATUS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    HOST_HEADER_FIELD_NUMBER: _ClassVar[int]
    SERVICE_NAME_FIELD_NUMBER: _ClassVar[int]
    SERVICE_INSTANCE_FIELD_NUMBER: _ClassVar[int]
    EXPECT_STATUSES_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_S_FIELD_NUMBER: _ClassVar[int]
    url: str
    expect_status: int
    attempts: int
    interval_s: float
    timeout_s: float
    host_header: str
    service_name: str
    service_instance: str
    expect_statuses: _containers.RepeatedScalarFieldContainer[int]
    deadline_s: float
    def __init__(self, url: _Optional[str] = ..., expect_status: _Optional[int] = ..., attempts: _Optional[int] = ..., interval_s: _Optional[float] = ..., timeout_s: _Optional[float] = ..., host_header: _Optional[str] = ..., service_name: _Optional[str] = ..., service_instance: _Optional[str] = ..., expect_statuses: _Optional[_Iterable[int]] = ..., deadline_s: _Optional[float] = ...) -> None: ...

class Operation(_message.Message):
    __slots__ = ("id", "exec", "write_file", "service_start", "service_stop", "service_list", "http_probe", "log_read", "release_seal", "redact")
    ID_FIELD_NUMBER: _ClassVar[int]
    EXEC_FIELD_NUMBER: _ClassVar[int]
    WRITE_FILE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_START_FIELD_NUMBER: _ClassVar[int]
    SERVICE_STOP_FIELD_NUMBER: _ClassVar[int]
    SERVICE_LIST_FIELD_NUMBER: _ClassVar[int]
    HTTP_PROBE_FIELD_NUMBER: _ClassVar[int]
    LOG_READ_FIELD_NUMBER: _ClassVar[int]
    RELEASE_SEAL_FIELD_NUMBER: _ClassVar[int]
    REDACT_FIELD_NUMBER: _ClassVar[int]
    id: str
    exec: ExecSpec
    write_file: WriteFileSpec
    service_start: ServiceStartSpec
    service_stop: ServiceStopSpec
    service_list: ServiceListSpec
    http_probe: HttpProbeSpec
    log_read: LogReadSpec
    release_seal: ReleaseSealSpec
    redact: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., exec: _Optional[_Union[ExecSpec, _Mapping]] = ..., write_file: _Optional[_Union[WriteFileSpec, _Mapping]] = ..., service_start: _Optional[_Union[ServiceStartSpec, _Mapping]] = ..., service_stop: _Optional[_Union[ServiceStopSpec, _Mapping]] = ..., service_list: _Optional[_Union[ServiceListSpec, _Mapping]] = ..., http_probe: _Optional[_Union[HttpProbeSpec, _Mapping]] = ..., log_read: _Optional[_Union[LogReadSpec, _Mapping]] = ..., release_seal: _Optional[_Union[ReleaseSealSpec, _Mapping]] = ..., redact: _Optional[_Iterable[str]] = ...) -> None: ...

class OutputChunk(_message.Message):
    __slots__ = ("op_id", "seq", "offset", "stream", "data")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    seq: int
    offset: int
    stream: Stream
    data: bytes
    def __init__(self, op_id: _Optional[str] = ..., seq: _Optional[int] = ..., offset: _Optional[int] = ..., stream: _Optional[_Union[Stream, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OperationResult(_message.Message):
    __slots__ = ("op_id", "outcome", "exit_code", "signal", "duration_s", "peak_rss_bytes", "cpu_s", "error", "output_bytes")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    outcome: Outcome
    exit_code: int
    signal: int
    duration_s: float
    peak_rss_bytes: int
    cpu_s: float
    error: str
    output_bytes: int
    def __init__(self, op_id: _Optional[str] = ..., outcome: _Optional[_Union[Outcome, str]] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., duration_s: _Optional[float] = ..., peak_rss_bytes: _Optional[int] = ..., cpu_s: _Optional[float] = ..., error: _Optional[str] = ..., output_bytes: _Optional[int] = ...) -> None: ...

class HostFacts(_message.Message):
    __slots__ = ("hostname", "cpus", "load1", "load5", "load15", "mem_total_bytes", "mem_available_bytes", "disk_free_bytes", "disk_total_bytes")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    LOAD1_FIELD_NUMBER: _ClassVar[int]
    LOAD5_FIELD_NUMBER: _ClassVar[int]
    LOAD15_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEM_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    cpus: int
    load1: float
    load5: float
    load15: float
    mem_total_bytes: int
    mem_available_bytes: int
    disk_free_bytes: int
    disk_total_bytes: int
    def __init__(self, hostname: _Optional[str] = ..., cpus: _Optional[int] = ..., load1: _Optional[float] = ..., load5: _Optional[float] = ..., load15: _Optional[float] = ..., mem_total_bytes: _Optional[int] = ..., mem_available_bytes: _Optional[int] = ..., disk_free_bytes: _Optional[int] = ..., disk_total_bytes: _Optional[int] = ...) -> None: ...

class HeldOperation(_message.Message):
    __slots__ = ("op_id", "state", "acked_offset")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACKED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    state: HeldState
    acked_offset: int
    def __init__(self, op_id: _Optional[str] = ..., state: _Optional[_Union[HeldState, str]] = ..., acked_offset: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_id", "roles", "capabilities", "version", "facts", "held", "heartbeat_interval_s", "services_root", "settings", "service_driver")
    class SettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    SERVICES_ROOT_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    SERVICE_DRIVER_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    version: str
    facts: HostFacts
    held: _containers.RepeatedCompositeFieldContainer[HeldOperation]
    heartbeat_interval_s: int
    services_root: str
    settings: _containers.ScalarMap[str, str]
    service_driver: str
    def __init__(self, agent_id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., capabilities: _Optional[_Iterable[str]] = ..., version: _Optional[str] = ..., facts: _Optional[_Union[HostFacts, _Mapping]] = ..., held: _Optional[_Iterable[_Union[HeldOperation, _Mapping]]] = ..., heartbeat_interval_s: _Optional[int] = ..., services_root: _Optional[str] = ..., settings: _Optional[_Mapping[str, str]] = ..., service_driver: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("facts", "running")
    FACTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    facts: HostFacts
    running: int
    def __init__(self, facts: _Optional[_Union[HostFacts, _Mapping]] = ..., running: _Optional[int] = ...) -> None: ...

class Accepted(_message.Message):
    __slots__ = ("op_id", "duplicate")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    duplicate: bool
    def __init__(self, op_id: _Optional[str] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ServiceExited(_message.Message):
    __slots__ = ("name", "instance", "exit_code", "signal", "at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    instance: str
    exit_code: int
    signal: int
    at: float
    def __init__(self, name: _Optional[str] = ..., instance: _Optional[str] = ..., exit_code: _Optional[int] = ..., signal: _Optional[int] = ..., at: _Optional[float] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "accepted", "output", "result", "exited", "probe_report")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    EXITED_FIELD_NUMBER: _ClassVar[int]
    PROBE_REPORT_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    accepted: Accepted
    output: OutputChunk
    result: OperationResult
    exited: ServiceExited
    probe_report: ProbeReport
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., accepted: _Optional[_Union[Accepted, _Mapping]] = ..., output: _Optional[_Union[OutputChunk, _Mapping]] = ..., result: _Optional[_Union[OperationResult, _Mapping]] = ..., exited: _Optional[_Union[ServiceExited, _Mapping]] = ..., probe_report: _Optional[_Union[ProbeReport, _Mapping]] = ...) -> None: ...

class Probe(_message.Message):
    __slots__ = ("round", "targets", "timeout_s")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    round: int
    targets: _containers.RepeatedCompositeFieldContainer[ProbeTarget]
    timeout_s: float
    def __init__(self, round: _Optional[int] = ..., targets: _Optional[_Iterable[_Union[ProbeTarget, _Mapping]]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class ProbeTarget(_message.Message):
    __slots__ = ("key", "host", "port", "path", "expect_statuses")
    KEY_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    EXPECT_STATUSES_FIELD_NUMBER: _ClassVar[int]
    key: str
    host: str
    port: int
    path: str
    expect_statuses: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, key: _Optional[str] = ..., host: _Optional[str] = ..., port: _Optional[int] = ..., path: _Optional[str] = ..., expect_statuses: _Optional[_Iterable[int]] = ...) -> None: ...

class ProbeReport(_message.Message):
    __slots__ = ("round", "results")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    results: _containers.RepeatedCompositeFieldContainer[ProbeResult]
    def __init__(self, round: _Optional[int] = ..., results: _Optional[_Iterable[_Union[ProbeResult, _Mapping]]] = ...) -> None: ...

class ProbeResult(_message.Message):
    __slots__ = ("key", "ok", "problem")
    KEY_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    key: str
    ok: bool
    problem: str
    def __init__(self, key: _Optional[str] = ..., ok: _Optional[bool] = ..., problem: _Optional[str] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("controller_version", "heartbeat_interval_s")
    CONTROLLER_VERSION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    controller_version: str
    heartbeat_interval_s: int
    def __init__(self, controller_version: _Optional[str] = ..., heartbeat_interval_s: _Optional[int] = ...) -> None: ...

class Cancel(_message.Message):
    __slots__ = ("op_id", "reason")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    reason: str
    def __init__(self, op_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("op_id", "offset", "result", "resend")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RESEND_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    offset: int
    result: bool
    resend: bool
    def __init__(self, op_id: _Optional[str] = ..., offset: _Optional[int] = ..., result: _Optional[bool] = ..., resend: _Optional[bool] = ...) -> None: ...

class Goodbye(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class ControllerMessage(_message.Message):
    __slots__ = ("welcome", "operation", "cancel", "ack", "goodbye", "probe")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    PROBE_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    operation: Operation
    cancel: Cancel
    ack: Ack
    goodbye: Goodbye
    probe: Probe
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., operation: _Optional[_Union[Operation, _Mapping]] = ..., cancel: _Optional[_Union[Cancel, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., goodbye: _Optional[_Union[Goodbye, _Mapping]] = ..., probe: _Optional[_Union[Probe, _Mapping]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("csr_pem",)
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    csr_pem: bytes
    def __init__(self, csr_pem: _Optional[bytes] = ...) -> None: ...

class Certificate(_message.Message):
    __slots__ = ("certificate_pem", "ca_pem", "roles", "not_after")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_PEM_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: bytes
    ca_pem: bytes
    roles: _containers.RepeatedScalarFieldContainer[str]
    not_after: float
    def __init__(self, certificate_pem: _Optional[bytes] = ..., ca_pem: _Optional[bytes] = ..., roles: _Optional[_Iterable[str]] = ..., not_after: _Optional[float] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("token", "agent_id", "csr_pem")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    token: str
    agent_id: str
    csr_pem: bytes
    def __init__(self, token: _Optional[str] = ..., agent_id: _Optional[str] = ..., csr_pem: _Optional[bytes] = ...) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("id", "roles", "capabilities", "state", "last_seen", "version", "facts", "peer", "running", "certificate_expires", "revoked", "granted", "address", "address_granted", "claimed", "labels", "capacity_memory_bytes", "capacity_cpu", "reserved_memory_bytes", "reserved_cpu", "instances")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_GRANTED_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_CPU_FIELD_NUMBER: _ClassVar[int]
    RESERVED_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVED_CPU_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    id: str
    roles: _containers.RepeatedScalarFieldContainer[str]
    capabilities: _containers.RepeatedScalarFieldContainer[str]
    state: AgentState
    last_seen: float
    version: str
    facts: HostFacts
    peer: str
    running: int
    certificate_expires: float
    revoked: bool
    granted: _containers.RepeatedScalarFieldContainer[str]
    address: str
    address_granted: bool
    claimed: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    capacity_memory_bytes: int
    capacity_cpu: float
    reserved_memory_bytes: int
    reserved_cpu: float
    instances: int
    def __init__(self, id: _Optional[str] = ..., roles: _Optional[_Iterable[str]] = ..., capabilities: _Optional[_Iterable[str]] = ..., state: _Optional[_Union[AgentState, str]] = ..., last_seen: _Optional[float] = ..., version: _Optional[str] = ..., facts: _Optional[_Union[HostFacts, _Mapping]] = ..., peer: _Optional[str] = ..., running: _Optional[int] = ..., certificate_expires: _Optional[float] = ..., revoked: _Optional[bool] = ..., granted: _Optional[_Iterable[str]] = ..., address: _Optional[str] = ..., address_granted: _Optional[bool] = ..., claimed: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ..., capacity_memory_bytes: _Optional[int] = ..., capacity_cpu: _Optional[float] = ..., reserved_memory_bytes: _Optional[int] = ..., reserved_cpu: _Optional[float] = ..., instances: _Optional[int] = ...) -> None: ...

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentsReply(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...

class Target(_message.Message):
    __slots__ = ("agent_ids", "roles", "all")
    AGENT_IDS_FIELD_NUMBER: _ClassVar[int]
    ROLES_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    agent_ids: _containers.RepeatedScalarFieldContainer[str]
    roles: _containers.RepeatedScalarFieldContainer[str]
    all: bool
    def __init__(self, agent_ids: _Optional[_Iterable[str]] = ..., roles: _Optional[_Iterable[str]] = ..., all: _Optional[bool] = ...) -> None: ...

class SubmitExecRequest(_message.Message):
    __slots__ = ("target", "exec")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    EXEC_FIELD_NUMBER: _ClassVar[int]
    target: Target
    exec: ExecSpec
    def __init__(self, target: _Optional[_Union[Target, _Mapping]] = ..., exec: _Optional[_Union[ExecSpec, _Mapping]] = ...) -> None: ...

class SubmittedOperation(_message.Message):
    __slots__ = ("agent_id", "op_id", "error")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    op_id: str
    error: str
    def __init__(self, agent_id: _Optional[str] = ..., op_id: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("operations",)
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    operations: _containers.RepeatedCompositeFieldContainer[SubmittedOperation]
    def __init__(self, operations: _Optional[_Iterable[_Union[SubmittedOperation, _Mapping]]] = ...) -> None: ...

class FollowRequest(_message.Message):
    __slots__ = ("op_ids", "from_offsets")
    class FromOffsetsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    OP_IDS_FIELD_NUMBER: _ClassVar[int]
    FROM_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    op_ids: _containers.RepeatedScalarFieldContainer[str]
    from_offsets: _containers.ScalarMap[str, int]
    def __init__(self, op_ids: _Optional[_Iterable[str]] = ..., from_offsets: _Optional[_Mapping[str, int]] = ...) -> None: ...

class OperationStatus(_message.Message):
    __slots__ = ("op_id", "agent_id", "state", "note")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    agent_id: str
    state: str
    note: str
    def __init__(self, op_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., state: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class FollowEvent(_message.Message):
    __slots__ = ("output", "result", "status")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    output: OutputChunk
    result: OperationResult
    status: OperationStatus
    def __init__(self, output: _Optional[_Union[OutputChunk, _Mapping]] = ..., result: _Optional[_Union[OperationResult, _Mapping]] = ..., status: _Optional[_Union[OperationStatus, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("op_ids", "reason")
    OP_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    op_ids: _containers.RepeatedScalarFieldContainer[str]
    reason: str
    def __init__(self, op_ids: _Optional[_Iterable[str]] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelReply(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, cancelled: _Optional[_Iterable[str]] = ...) -> None: ...

class GetOperationRequest(_message.Message):
    __slots__ = ("op_id",)
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    def __init__(self, op_id: _Optional[str] = ...) -> None: ...

class OperationRecord(_message.Message):
    __slots__ = ("op_id", "agent_id", "kind", "argv", "state", "created", "finished", "result", "output_bytes")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGV_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    agent_id: str
    kind: str
    argv: _containers.RepeatedScalarFieldContainer[str]
    state: str
    created: float
    finished: float
    result: OperationResult
    output_bytes: int
    def __init__(self, op_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., kind: _Optional[str] = ..., argv: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., created: _Optional[float] = ..., finished: _Optional[float] = ..., result: _Optional[_Union[OperationResult, _Mapping]] = ..., output_bytes: _Optional[int] = ...) -> None: ...

class OrderRequest(_message.Message):
    __slots__ = ("spec_text", "spec_name", "options_text", "options_name", "diff_text", "diff_name", "environment", "prune", "base_dir")
    SPEC_TEXT_FIELD_NUMBER: _ClassVar[int]
    SPEC_NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_TEXT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_NAME_FIELD_NUMBER: _ClassVar[int]
    DIFF_TEXT_FIELD_NUMBER: _ClassVar[int]
    DIFF_NAME_FIELD_NUMBER: _ClassVar[int]
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    PRUNE_FIELD_NUMBER: _ClassVar[int]
    BASE_DIR_FIELD_NUMBER: _ClassVar[int]
    spec_text: str
    spec_name: str
    options_text: str
    options_name: str
    diff_text: str
    diff_name: str
    environment: str
    prune: bool
    base_dir: str
    def __init__(self, spec_text: _Optional[str] = ..., spec_name: _Optional[str] = ..., options_text: _Optional[str] = ..., options_name: _Optional[str] = ..., diff_text: _Optional[str] = ..., diff_name: _Optional[str] = ..., environment: _Optional[str] = ..., prune: _Optional[bool] = ..., base_dir: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("environment", "service", "to", "reload")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    RELOAD_FIELD_NUMBER: _ClassVar[int]
    environment: str
    service: str
    to: int
    reload: bool
    def __init__(self, environment: _Optional[str] = ..., service: _Optional[str] = ..., to: _Optional[int] = ..., reload: _Optional[bool] = ...) -> None: ...

class CheckRequest(_message.Message):
    __slots__ = ("environment", "action", "dry_run", "purge_data")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    PURGE_DATA_FIELD_NUMBER: _ClassVar[int]
    environment: str
    action: str
    dry_run: bool
    purge_data: bool
    def __init__(self, environment: _Optional[str] = ..., action: _Optional[str] = ..., dry_run: _Optional[bool] = ..., purge_data: _Optional[bool] = ...) -> None: ...

class ServiceLogsRequest(_message.Message):
    __slots__ = ("environment", "service", "follow", "tail", "instance", "since", "until", "timestamps")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    TAIL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPS_FIELD_NUMBER: _ClassVar[int]
    environment: str
    service: str
    follow: bool
    tail: int
    instance: int
    since: str
    until: str
    timestamps: bool
    def __init__(self, environment: _Optional[str] = ..., service: _Optional[str] = ..., follow: _Optional[bool] = ..., tail: _Optional[int] = ..., instance: _Optional[int] = ..., since: _Optional[str] = ..., until: _Optional[str] = ..., timestamps: _Optional[bool] = ...) -> None: ...

class PlanReply(_message.Message):
    __slots__ = ("plan_json",)
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    plan_json: str
    def __init__(self, plan_json: _Optional[str] = ...) -> None: ...

class ApplyReply(_message.Message):
    __slots__ = ("job_id", "plan_json")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    plan_json: str
    def __init__(self, job_id: _Optional[str] = ..., plan_json: _Optional[str] = ...) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("job_id", "follow")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    follow: bool
    def __init__(self, job_id: _Optional[str] = ..., follow: _Optional[bool] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class EnvRef(_message.Message):
    __slots__ = ("environment", "service")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    environment: str
    service: str
    def __init__(self, environment: _Optional[str] = ..., service: _Optional[str] = ...) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("environment", "after")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    environment: str
    after: int
    def __init__(self, environment: _Optional[str] = ..., after: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ("environment", "service", "restore_from")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FROM_FIELD_NUMBER: _ClassVar[int]
    environment: str
    service: str
    restore_from: str
    def __init__(self, environment: _Optional[str] = ..., service: _Optional[str] = ..., restore_from: _Optional[str] = ...) -> None: ...

class JsonReply(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class SecretRequest(_message.Message):
    __slots__ = ("environment", "name", "value")
    ENVIRONMENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    environment: str
    name: str
    value: str
    def __init__(self, environment: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenRequest(_message.Message):
    __slots__ = ("roles", "ttl_s", "agent_id", "provides", "address")
    ROLES_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    roles: _containers.RepeatedScalarFieldContainer[str]
    ttl_s: float
    agent_id: str
    provides: _containers.RepeatedScalarFieldContainer[str]
    address: str
    def __init__(self, roles: _Optional[_Iterable[str]] = ..., ttl_s: _Optional[float] = ..., agent_id: _Optional[str] = ..., provides: _Optional[_Iterable[str]] = ..., address: _Optional[str] = ...) -> None: ...

class TokenReply(_message.Message):
    __slots__ = ("token", "expires_at", "token_id")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: float
    token_id: str
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[float] = ..., token_id: _Optional[str] = ...) -> None: ...

class TokenRef(_message.Message):
    __slots__ = ("token_id",)
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    def __init__(self, token_id: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ("all",)
    ALL_FIELD_NUMBER: _ClassVar[int]
    all: bool
    def __init__(self, all: _Optional[bool] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("agent_id",)
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    def __init__(self, agent_id: _Optional[str] = ...) -> None: ...

class RevokeReply(_message.Message):
    __slots__ = ("certificates", "disconnected")
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    DISCONNECTED_FIELD_NUMBER: _ClassVar[int]
    certificates: int
    disconnected: bool
    def __init__(self, certificates: _Optional[int] = ..., disconnected: _Optional[bool] = ...) -> None: ...

class OperatorTokenRequest(_message.Message):
    __slots__ = ("role", "ttl_s", "label")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    role: str
    ttl_s: float
    label: str
    def __init__(self, role: _Optional[str] = ..., ttl_s: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class OperatorTokenRevokeReply(_message.Message):
    __slots__ = ("revoked",)
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    revoked: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revoked: _Optional[_Iterable[str]] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("agent_id", "provides", "address", "ungrant", "clear_address", "memory_bytes", "cpu", "labels", "unlabel", "clear_capacity")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDES_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UNGRANT_FIELD_NUMBER: _ClassVar[int]
    CLEAR_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    UNLABEL_FIELD_NUMBER: _ClassVar[int]
    CLEAR_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    provides: _containers.RepeatedScalarFieldContainer[str]
    address: str
    ungrant: bool
    clear_address: bool
    memory_bytes: int
    cpu: float
    labels: _containers.ScalarMap[str, str]
    unlabel: _containers.RepeatedScalarFieldContainer[str]
    clear_capacity: bool
    def __init__(self, agent_id: _Optional[str] = ..., provides: _Optional[_Iterable[str]] = ..., address: _Optional[str] = ..., ungrant: _Optional[bool] = ..., clear_address: _Optional[bool] = ..., memory_bytes: _Optional[int] = ..., cpu: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ..., unlabel: _Optional[_Iterable[str]] = ..., clear_capacity: _Optional[bool] = ...) -> None: ...

class GrantReply(_message.Message):
    __slots__ = ("granted", "address", "address_granted", "not_granted", "memory_bytes", "cpu", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_GRANTED_FIELD_NUMBER: _ClassVar[int]
    NOT_GRANTED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CPU_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    granted: _containers.RepeatedScalarFieldContainer[str]
    address: str
    address_granted: bool
    not_granted: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    cpu: float
    labels: _containers.ScalarMap[str, str]
    def __init__(self, granted: _Optional[_Iterable[str]] = ..., address: _Optional[str] = ..., address_granted: _Optional[bool] = ..., not_granted: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ..., cpu: _Optional[float] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...
