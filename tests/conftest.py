from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    RESTIC_BINARIES,
    Cluster,
    GatewayProcess,
    ModuleRepositories,
    RedisServer,
    fresh_cluster,
    stop_gateways,
)
from identities import NODE_ID

# In CI, and wherever the suite runs as root (as `make test` does on a node), the machine is
# expected to run every test: a skip there hides a test that could have failed.
STRICT_SKIPS = os.environ.get("CI") == "true" or os.geteuid() == 0
_skipped: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(
            report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if STRICT_SKIPS and _skipped and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter,
                            config: pytest.Config) -> None:
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None:  # -q hides pytest-randomly's own header line
        terminalreporter.write_line(f"random order: replay with -p randomly "
                                    f"--randomly-seed={seed}")
    if not _skipped:
        return
    title = ("skipped tests FAIL this run (CI=true or root: every test must run here)"
             if STRICT_SKIPS else "skipped tests")
    terminalreporter.section(title, sep="!" if STRICT_SKIPS else "-", red=STRICT_SKIPS)
    for nodeid, reason in _skipped:
        terminalreporter.line(f"{nodeid}: {reason}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "image: runs the built container image; only with "
                            "`-m image` (`make image-test`)")
    config.addinivalue_line("markers", "serial: measures durations, rates or memory that "
                            "other tests running beside it would change: `make test` runs "
                            "these alone, after the others (`-m serial`)")
    config.addinivalue_line("markers", "long(seconds): lasts about that long, mostly "
                            "waiting; the parallel pass starts it first")


@pytest.hookimpl(trylast=True)  # after the shuffle and after -m
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The image tests need `make image` first: left out unless -m names them.
    if "image" not in (config.option.markexpr or ""):
        image = [item for item in items if item.get_closest_marker("image")]
        if image:
            config.hook.pytest_deselected(items=image)
            items[:] = [item for item in items if not item.get_closest_marker("image")]
    workerinput = getattr(config, "workerinput", None)  # an xdist worker's
    if workerinput is not None and workerinput.get("dist") == "worksteal":
        _long_tests_first(items, int(workerinput["workercount"]))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:  # xdist's main process, for each worker
    node.workerinput["dist"] = node.config.getoption("dist")  # a worker's own says "no"


def _long_tests_first(items: list[pytest.Item], workers: int) -> None:
    """xdist's worksteal hands each worker a run of the collection, the runs in turn, and
    an idle worker takes half of the tail of the longest queue: a test of minutes that
    comes late in a run makes the whole pass wait for it. The tests marked `long` go to the
    heads of the runs instead, the longest first, each to the run with the fewest seconds
    so far. Every worker computes the same order (it is a function of the shuffled
    collection and of the worker count): xdist checks that they agree."""
    def seconds(item: pytest.Item) -> float:
        marker = item.get_closest_marker("long")
        return float(marker.args[0]) if marker is not None else 0.0

    long = sorted((item for item in items if seconds(item)), key=seconds, reverse=True)
    if not long or workers < 2:
        return
    rest = [item for item in items if not seconds(item)]
    sizes, left = [], len(items)  # the runs as worksteal cuts them
    for worker in range(workers):
        sizes.append(left // (workers - worker))
        left -= sizes[-1]
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    planned = [0.0] * workers
    for item in long:
        worker = min((w for w in range(workers) if len(heads[w]) < sizes[w]),
                     key=lambda w: planned[w])
        heads[worker].append(item)
        planned[worker] += seconds(item)
    ordered: list[pytest.Item] = []
    for worker in range(workers):
        take = sizes[worker] - len(heads[worker])
        ordered += heads[worker] + rest[:take]
        rest = rest[take:]
    items[:] = ordered


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(redis_server: RedisServer) -> Iterator[Cluster]:
    with fresh_cluster(redis_server) as seeded:
        yield seeded


@pytest.fixture
def gateway_factory(redis_server: RedisServer, tmp_path: Path):
    """Starts gateways on the test's Redis; at the end stops them, and a process of theirs
    that outlives them fails the test."""
    started: list[GatewayProcess] = []

    def start_gateway(node_id: str | int = NODE_ID, *, redis_url: str | None = None,
                      workdir: Path | None = None, **kwargs) -> GatewayProcess:
        workdir = workdir or tmp_path / f"gateway{len(started)}"
        gateway = GatewayProcess.start(redis_url or redis_server.url, node_id, workdir, **kwargs)
        started.append(gateway)
        return gateway

    try:
        yield start_gateway
    finally:
        stop_gateways(*started)


@pytest.fixture(params=sorted(RESTIC_BINARIES))
def restic_binary(request: pytest.FixtureRequest) -> str:
    """Each restic client the suite runs, by name (`restic-0.14`, `restic-0.18`): the
    machine's own and the one the cluster's images run. Pass it as `binary=`."""
    return RESTIC_BINARIES[request.param]


@pytest.fixture
def limits(env: ModuleRepositories) -> Iterator[ModuleRepositories]:
    """A test module's `env` (its module repositories) with no bandwidth limit before and
    after the test."""
    env.set_limits({})
    try:
        yield env
    finally:
        env.set_limits({})
