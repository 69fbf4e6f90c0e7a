"""An autobahn-python peer for the interop tests in wamp/tests/interop_autobahn.rs.

Usage: autobahn_peer.py SCENARIO URL SERIALIZER [ARGS...]

Each scenario joins our router as a real autobahn ApplicationSession, checks what it is
supposed to see, prints progress lines on stdout ("READY <session>", "OK <what>") for the
Rust side, reads instructions from stdin, and exits 0 only if every expectation held.
"""

import asyncio
import json
import sys
import traceback
from urllib.parse import urlparse

from autobahn.asyncio.wamp import ApplicationSession
from autobahn.asyncio.websocket import WampWebSocketClientFactory
from autobahn.wamp import auth
from autobahn.wamp.exception import ApplicationError
from autobahn.wamp.serializer import CBORSerializer, JsonSerializer, MsgPackSerializer
from autobahn.wamp.types import CallResult, ComponentConfig, PublishOptions

SERIALIZERS = {"json": JsonSerializer, "msgpack": MsgPackSerializer, "cbor": CBORSerializer}
WAIT = 10.0


def say(*words):
    print(*words, flush=True)


class Refused(Exception):
    def __init__(self, reason, message):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


async def join(url, serializer, authmethods=None, authid=None, secret=None, ticket=None, realm="s4t"):
    """Opens a session; returns it once joined, or raises Refused with the ABORT reason."""
    loop = asyncio.get_running_loop()
    joined = loop.create_future()

    class Session(ApplicationSession):
        def onConnect(self):
            self.join(realm, authmethods=authmethods, authid=authid)

        def onChallenge(self, challenge):
            if challenge.method == "ticket":
                return ticket
            if challenge.method == "wampcra":
                key = secret.encode("utf8")
                if "salt" in challenge.extra:
                    key = auth.derive_key(key, challenge.extra["salt"], challenge.extra["iterations"],
                                          challenge.extra["keylen"])
                return auth.compute_wcs(key, challenge.extra["challenge"].encode("utf8")).decode("ascii")
            raise Exception(f"unexpected challenge {challenge.method}")

        async def onJoin(self, details):
            if not joined.done():
                joined.set_result(self)

        def onLeave(self, details):
            if not joined.done():
                joined.set_exception(Refused(details.reason, details.message))
            self.disconnect()

    u = urlparse(url)
    factory = WampWebSocketClientFactory(lambda: Session(ComponentConfig(realm)), url=url,
                                         serializers=[SERIALIZERS[serializer]()])
    await loop.create_connection(factory, u.hostname, u.port)
    return await asyncio.wait_for(joined, WAIT)


async def expect_error(uri, coro):
    try:
        await coro
    except ApplicationError as e:
        assert e.error == uri, f"expected {uri}, got {e.error}: {e}"
        return
    raise AssertionError(f"expected {uri}, but the request succeeded")


async def stdin_line():
    line = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline), WAIT)
    return line.strip()


async def leave(session):
    await session.leave()
    await asyncio.sleep(0)


async def board(url, serializer, board_id, secret, other_board):
    """A board (WAMP-CRA): registers under its own prefix, calls the cloud, publishes, and is
    refused everything else."""
    s = await join(url, serializer, ["wampcra"], board_id, secret=secret)
    sid = s._session_id
    prefix = f"iotronic.{sid}.{board_id}"

    def echo(*args, **kwargs):
        return CallResult(*args, **kwargs)

    await s.register(echo, f"{prefix}.DeviceEcho")
    seen = await s.call("agent.stack4things.connection", uuid=board_id, session=sid)
    assert seen["caller"] == sid and seen["authid"] == board_id and seen["role"] == "board", seen
    assert seen["kwargs"] == {"uuid": board_id, "session": sid}, seen
    say("OK call")
    await s.publish(f"board.{board_id}.gpio", {"line": "GPIO4", "value": 1},
                    options=PublishOptions(acknowledge=True))
    say("OK publish")
    denied = "wamp.error.not_authorized"
    await expect_error(denied, s.register(echo, f"iotronic.{sid}.{other_board}.DeviceEcho"))
    await expect_error(denied, s.register(echo, "agent.stack4things.connection"))
    await expect_error(denied, s.call("wamp.session.list"))
    await expect_error(denied, s.call(f"iotronic.1.{other_board}.DevicePing"))
    await expect_error(denied, s.subscribe(lambda *a: None, "wamp.session.on_join"))
    await expect_error(denied, s.publish(f"board.{other_board}.gpio", 1, options=PublishOptions(acknowledge=True)))
    say("OK refusals")
    say("READY", sid)
    assert await stdin_line() == "bye"
    await leave(s)


async def agent(url, serializer, ticket):
    """The cloud's side (ticket, role agent): meta events and procedures, calls to a board."""
    s = await join(url, serializer, ["ticket"], "agent", ticket=ticket)
    joins, leaves = asyncio.Queue(), asyncio.Queue()
    await s.subscribe(lambda details: joins.put_nowait(details), "wamp.session.on_join")
    await s.subscribe(lambda session_id: leaves.put_nowait(session_id), "wamp.session.on_leave")
    me = await s.call("wamp.session.get", s._session_id)
    assert me["authrole"] == "agent" and me["authmethod"] == "ticket", me
    say("READY", s._session_id)
    words = (await stdin_line()).split()
    assert words[0] == "board", words
    sid, board_id = int(words[1]), words[2]
    while True:
        details = await asyncio.wait_for(joins.get(), WAIT)
        if details["session"] == sid:
            break
    assert details["authid"] == board_id and details["authrole"] == "board", details
    assert details["transport"]["type"] == "websocket", details
    say("OK on_join")
    assert sid in await s.call("wamp.session.list")
    assert await s.call("wamp.session.count", ["board"]) >= 1
    got = await s.call("wamp.session.get", sid)
    assert got["authid"] == board_id, got
    say("OK meta")
    result = await s.call(f"iotronic.{sid}.{board_id}.DevicePing", {"uuid": "req-1"}, "x", flag=True)
    assert list(result.results) == [{"uuid": "req-1"}, "x"] and result.kwresults == {"flag": True}, result
    say("OK call")
    assert await stdin_line() == "left"
    while await asyncio.wait_for(leaves.get(), WAIT) != sid:
        pass
    say("OK on_leave")
    await leave(s)


async def refused(url, serializer, board_id, ticket):
    """Wrong credentials are aborted; enrollment sessions may only call register."""
    for kwargs, reason in [
        (dict(authmethods=["wampcra"], authid=board_id, secret="guess"), "wamp.error.authentication_failed"),
        (dict(authmethods=["ticket"], authid="enroll", ticket="WRONG"), "wamp.error.authentication_failed"),
        (dict(authmethods=["anonymous"]), "wamp.error.no_auth_method"),
        (dict(authmethods=["ticket"], authid="enroll", ticket=ticket, realm="other"), "wamp.error.no_such_realm"),
    ]:
        try:
            s = await join(url, serializer, **kwargs)
        except Refused as e:
            assert e.reason == reason, f"{kwargs}: {e}"
        else:
            raise AssertionError(f"{kwargs} was accepted as {s._session_id}")
    say("OK aborts")
    s = await join(url, serializer, ["ticket"], "enroll", ticket=ticket)
    await expect_error("wamp.error.not_authorized", s.call("agent.stack4things.connection", uuid=board_id))
    await expect_error("wamp.error.not_authorized", s.register(lambda: 1, "stack4things.register"))
    result = await s.call("stack4things.register", code=ticket, session=s._session_id)
    assert json.loads(result)["result"] == "SUCCESS", result
    say("OK enrollment")
    await leave(s)


async def legacy(url, serializer, board_id):
    """An original lightning-rod: anonymous, confined until its connection call succeeds."""
    s = await join(url, serializer)
    sid = s._session_id
    proc = f"iotronic.{sid}.{board_id}.DevicePing"
    await expect_error("wamp.error.not_authorized", s.register(lambda req: "pong", proc))
    reply = await s.call("agent.stack4things.connection", uuid=board_id, session=sid,
                         info={"lr_version": "0.5.0", "connectivity": {}})
    assert json.loads(reply) == {"message": "", "result": "SUCCESS"}, reply
    await s.register(lambda req: json.dumps({"message": "pong", "result": "SUCCESS", "req_id": req["uuid"]}), proc)
    say("READY", sid)
    assert await stdin_line() == "bye"
    await leave(s)


async def main(argv):
    scenario, url, serializer, *rest = argv
    await {"board": board, "agent": agent, "refused": refused, "legacy": legacy}[scenario](url, serializer, *rest)
    say("DONE")


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1:]))
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
