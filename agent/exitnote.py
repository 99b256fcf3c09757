"""Run by systemd as a service instance's ExecStopPost= (as root, `+`): tell the agent how the
process ended, in one datagram on the agent's own socket, so that the agent reports the end at
once, as its built-in supervisor does. systemd gives the end in $SERVICE_RESULT, $EXIT_CODE
(exited, killed, dumped) and $EXIT_STATUS. If the agent is not there to hear it, nothing is
lost: the next hello's listing finds the instance dead.

Standard library only, nothing of the tenant read: `python3 -I -S -B exitnote.py SOCKET NAME INSTANCE`.
"""

import json
import os
import socket
import sys


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        return 0
    note = {"name": argv[2], "instance": argv[3], "result": os.environ.get("SERVICE_RESULT", ""),
            "code": os.environ.get("EXIT_CODE", ""), "status": os.environ.get("EXIT_STATUS", "")}
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            sock.sendto(json.dumps(note).encode()[:4096], argv[1])
    except OSError:
        pass  # no agent listening: its next hello finds the end
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
