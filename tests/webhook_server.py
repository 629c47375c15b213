"""A webhook receiver for tests/watch.rs: appends each POSTed body as a line to FILE and answers 200.

    python3 tests/webhook_server.py FILE [PORT]

Prints the port it listens on (PORT, or a free one) as its first line.
"""

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with open(sys.argv[1], "ab") as received:
            received.write(body.rstrip(b"\n") + b"\n")
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0), Receiver)
print(server.server_address[1], flush=True)
server.serve_forever()
