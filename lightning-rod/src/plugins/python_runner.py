"""Runs one legacy lightning-rod plugin outside the agent, with the original contract.

The plugin source defines `class Worker(Plugin.Plugin)` (a thread) with
`__init__(uuid, name, q_result=None, params=None)` and `run()`. The agent writes a JSON job on
stdin: {"uuid", "name", "board", "params", "mode": "call"|"start"}.
  call:  run the worker with a queue; print the first result it puts as one JSON line.
  start: run it until SIGTERM, then `stop()` it (clears `_is_running`) and join it.
The imports the original offers are shimmed: iotronic_lightningrod.modules.plugins.Plugin and
.pluginApis, iotronic_lightningrod.lightningrod, oslo_log.log (stdlib logging to stderr).
"""
import json
import logging
import queue
import signal
import sys
import threading
import types


def _module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class Plugin(threading.Thread):
    def __init__(self, uuid, name, q_result=None, params=None):
        threading.Thread.__init__(self, daemon=True)
        self.uuid = uuid
        self.name = name
        self.status = "INITED"
        self._is_running = True
        self.params = params
        self.q_result = q_result

    def run(self):
        raise NotImplementedError("the plugin's Worker must define run()")

    def stop(self):
        self._is_running = False

    def checkStatus(self):
        return self.status

    def setStatus(self, status):
        self.status = status

    def complete(self, rpc_name, result):
        self.setStatus(result)
        return rpc_name + " result: " + self.checkStatus()


def _install_shims(job):
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if "oslo_log" not in sys.modules:
        try:
            import oslo_log.log  # noqa: F401  (a board that has it keeps its behaviour)
        except ImportError:
            _module("oslo_log")
            sys.modules["oslo_log"].log = _module("oslo_log.log", getLogger=logging.getLogger)
    board = types.SimpleNamespace(uuid=job.get("board"), location=None, gpio=None)
    top = _module("iotronic_lightningrod")
    lr = _module("iotronic_lightningrod.lightningrod", board=board)
    modules = _module("iotronic_lightningrod.modules")
    plugins = _module("iotronic_lightningrod.modules.plugins")
    plugin_mod = _module("iotronic_lightningrod.modules.plugins.Plugin", Plugin=Plugin)
    apis = _module(
        "iotronic_lightningrod.modules.plugins.pluginApis",
        getBoardID=lambda: board.uuid,
        getLocation=lambda: board.location,
        getBoardGpio=lambda: board.gpio,
    )
    top.lightningrod, top.modules, modules.plugins = lr, modules, plugins
    plugins.Plugin, plugins.pluginApis = plugin_mod, apis


def _load(path):
    scope = {"__name__": "plugin", "__file__": path}
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    exec(code, scope)
    worker = scope.get("Worker")
    if worker is None:
        raise RuntimeError("the plugin defines no Worker class")
    return worker


def main():
    job = json.loads(sys.stdin.readline() or "{}")
    _install_shims(job)
    worker_class = _load(sys.argv[1])
    params = job.get("params") or {}
    if job.get("mode") == "call":
        results = queue.Queue()
        worker = worker_class(job["uuid"], job["name"], results, params)
        worker.start()
        while True:
            try:
                result = results.get(timeout=0.2)
                break
            except queue.Empty:
                if not worker.is_alive() and results.empty():
                    sys.stderr.write("the plugin ended without putting a result\n")
                    return 3
        sys.stdout.write(json.dumps(result, default=str) + "\n")
        sys.stdout.flush()
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = worker_class(job["uuid"], job["name"], None, params)
    worker.start()
    while worker.is_alive() and not stop.wait(0.2):
        pass
    worker.stop()
    worker.join(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
