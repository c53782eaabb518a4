"""Bench target on the compute host: ``GET /bulk?mb=N`` streams N MB, ``/ws`` echoes frames."""

import sys

from tornado import ioloop, web, websocket

CHUNK = b"x" * (1 << 20)


class Bulk(web.RequestHandler):
    async def get(self):
        megabytes = int(self.get_argument("mb", "100"))
        self.set_header("Content-Length", str(megabytes << 20))
        for _ in range(megabytes):
            self.write(CHUNK)
            await self.flush()


class Echo(websocket.WebSocketHandler):
    def on_message(self, message):
        self.write_message(message, binary=isinstance(message, bytes))


if __name__ == "__main__":
    web.Application([("/bulk", Bulk), ("/ws", Echo)]).listen(int(sys.argv[1]), "0.0.0.0")
    ioloop.IOLoop.current().start()
