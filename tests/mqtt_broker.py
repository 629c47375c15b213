"""An MQTT broker for tests/watch.rs (amqtt, from PyPI): records every message published to it, one payload per
line in FILE, and acknowledges it (QoS 1) as any broker does.

    python3 tests/mqtt_broker.py FILE [PORT]

Prints the port it listens on (PORT, or a free one) as its first line once it accepts connections.
"""

import asyncio
import socket
import sys

from amqtt.broker import Broker
from amqtt.plugins.base import BasePlugin


class Recorder(BasePlugin):
    async def on_broker_message_received(self, *, client_id, message):
        with open(sys.argv[1], "ab") as received:
            received.write(bytes(message.data).rstrip(b"\n") + b"\n")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def main():
    port = int(sys.argv[2]) if len(sys.argv) > 2 and sys.argv[2] != "0" else free_port()
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
                "__main__.Recorder": {},
            },
        }
    )
    await broker.start()
    print(port, flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
