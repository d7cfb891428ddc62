"""An addon that does nothing, with the same hooks as Cooldown: measures what mitmproxy itself
charges for running a script addon's hooks (benchmark 3's third variant)."""

from mitmproxy import http


class Noop:
    name = "bench_noop"

    async def request(self, flow: http.HTTPFlow) -> None:
        return None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        return None

    async def response(self, flow: http.HTTPFlow) -> None:
        return None

    def error(self, flow: http.HTTPFlow) -> None:
        return None

    def client_disconnected(self, client: object) -> None:
        return None

    def update(self, flows: list[object]) -> None:
        return None


addons = [Noop()]
