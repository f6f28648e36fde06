"""A slow, deterministic OpenAI-compatible model for the fault tests.

Every answer is a valid decision that depends only on the prompt (a hash of the messages), so
a crashed-and-restarted run and a crash-free run agree whenever they send the same prompts. It
answers after 50-200 ms (also from the hash), so a worker killed at a random moment has
decisions in flight. Built on tests/openai_script_server.py; keeps no request bodies, only
counts, so a long soak does not grow its memory.
"""

from __future__ import annotations

import hashlib
import json
import threading

from openai_script_server import Call, Reply, ScriptedOpenAIServer, chat_reply

__all__ = ["SlowModel", "answer_for"]

_ACTIONS = ("none", "notify", "inspect_sensor", "dispatch_technician", "emergency_shutdown")
_SEVERITIES = ("info", "low", "medium", "high", "critical")


def answer_for(messages: list[dict]) -> tuple[dict, float]:
    """The decision JSON and the delay (s) for a prompt."""
    h = hashlib.blake2b(json.dumps(messages, sort_keys=True).encode(), digest_size=8).digest()
    answer = {"action": _ACTIONS[h[0] % len(_ACTIONS)], "severity": _SEVERITIES[h[1] % len(_SEVERITIES)],
              "reason": f"model {h.hex()}", "confidence": round(0.5 + h[2] / 510, 3)}
    return answer, 0.05 + (int.from_bytes(h[3:5], "big") % 151) / 1000.0


class SlowModel(ScriptedOpenAIServer):
    """`with SlowModel() as m:` then point the edge tier at `m.url`."""

    def __init__(self) -> None:
        super().__init__(self._answer)
        self.answered = 0
        self._count_lock = threading.Lock()
        # a worker killed mid-request resets its connections: expected here, not worth a traceback
        self._httpd.handle_error = lambda request, client_address: None

    def _answer(self, call: Call) -> Reply:
        self.calls.clear()  # counts only: see the module docstring
        answer, delay = answer_for(call.body.get("messages", []))
        with self._count_lock:
            self.answered += 1
        r = chat_reply(json.dumps(answer), model="fault-model")
        r.delay_s = delay
        return r
