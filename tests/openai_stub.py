"""A scripted OpenAI-compatible HTTP server on 127.0.0.1 (in a thread), for the replies a real server does not give on
demand: statuses, cut or HTML bodies, null or empty choices. Used by tests/test_api_teacher.py and
benchmarks/fault_sweep.py."""

import http.server
import json
import threading
from collections.abc import Callable


Answer = tuple[int, object, dict[str, str]]  # (status, body: bytes as they are / anything else as JSON, headers)


def reply(text: str | None, completions: bool = False, finish_reason: str = "stop") -> dict:
    """A 200 body of the chat (or completions) endpoint whose only choice says `text` (None: null)."""
    choice = {"index": 0, "finish_reason": finish_reason}
    choice.update({"text": text} if completions else {"message": {"role": "assistant", "content": text}})
    return {
        "id": "x",
        "object": "text_completion" if completions else "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [choice],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


class ScriptedServer:
    """Answers every POST with `answer(path, body, headers)` -> `(status, body, headers)`; `root` is
    `http://127.0.0.1:<port>`. Always `close()` it."""

    def __init__(self, answer: Callable[[str, bytes, dict], Answer]):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status, data, headers = answer(self.path, body, dict(self.headers))
                data = data if isinstance(data, bytes) else json.dumps(data).encode()
                self.send_response(status)
                self.send_header("content-type", "text/html" if data.startswith(b"<") else "application/json")
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except OSError:  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
