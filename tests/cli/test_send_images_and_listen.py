"""`fmnist send-images` and `fmnist listen`: the original three-terminal demo against a real `fmnist serve`."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fmnist_client import AsyncClient, Client, Prediction
from PIL import Image

from app.cli.listen import ListenStats, _latency_line
from app.cli.send_images import SendSummary, load_test_set, send_images
from ml.readers import IDX_IMAGES_MAGIC, read_idx
from tests.conftest import REPO_ROOT
from tests.e2e.processes import free_port
from tests.sdk.conftest import LiveServer, sdk_settings, service_app
from tests.sdk.serving import fmnist_serve, served_checkpoint

pytestmark = pytest.mark.timeout(120)

CLI_TIMEOUT_S = 60


def fmnist(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run `fmnist ARGS` to completion, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        **kwargs,  # type: ignore[call-overload]
    )


def start_listen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "app", "listen", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def finish(process: subprocess.Popen[str], timeout: float = CLI_TIMEOUT_S) -> tuple[int, str, str]:
    """Wait for a started command; kill it (by PID) if it overstays. Returns (exit code, stdout, stderr)."""
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"command did not finish within {timeout} s\n{out}\n{err}")
    return process.returncode, out, err


@pytest.fixture(scope="module")
def service_url(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[str]:
    """One `fmnist serve` with the shipped checkpoint for this module."""
    with fmnist_serve(tmp_path_factory.mktemp("cli-serve"), served_checkpoint(request)) as url:
        yield url


@pytest.mark.e2e
@pytest.mark.data
def test_send_images_and_listen_score_the_shipped_model(
    service_url: str, fashion_mnist_dir: Path
) -> None:
    """200 real test images sent by send-images are all scored by listen, which exits by itself at
    --count with accuracy, throughput and p50/p90/p99 latencies (service and end-to-end)."""
    listener = start_listen("--url", service_url, "--count", "200", "--after", "0")
    try:
        sent = fmnist(
            "send-images", "--url", service_url, "--count", "200", "--concurrency", "16",
            "--data-dir", str(fashion_mnist_dir), "--no-progress",
        )  # fmt: skip
        code, out, err = finish(listener)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "accepted 200, failed 0" in sent.stdout
    assert code == 0, out + err
    accuracy = re.search(r"^accuracy\s+([\d.]+)% \((\d+)/(\d+) labelled\)", out, re.M)
    assert accuracy is not None, out
    assert int(accuracy[3]) == 200 and float(accuracy[1]) >= 80.0  # the shipped model scores ~90 %
    assert re.search(r"^results\s+200 \(0 failed\), [\d.]+ results/s", out, re.M), out
    for name in ("service ms", "end-to-end ms"):
        assert re.search(rf"^{name}\s+p50 [\d.]+\s+p90 [\d.]+\s+p99 [\d.]+", out, re.M), out


@pytest.mark.e2e
def test_listen_prints_the_final_figures_on_ctrl_c(service_url: str) -> None:
    """Ctrl-C (SIGINT) ends listen with exit 0 and the final summary, after it showed a running line."""
    listener = start_listen("--url", service_url)
    try:
        assert listener.stderr is not None
        assert "connecting to" in listener.stderr.readline()
        # Without --after it sees results from now on: send once the stream is connected.
        assert "connected to" in listener.stderr.readline()
        time.sleep(0.2)
        with Client(service_url) as client:
            for name in ("ankle-boot", "trouser", "sneaker"):
                client.predict(REPO_ROOT / "clients" / "python" / "examples" / f"{name}.png")
        time.sleep(0.3)
        listener.send_signal(signal.SIGINT)
        code, out, err = finish(listener, timeout=20)
    finally:
        if listener.poll() is None:
            listener.kill()
    assert code == 0, out + err
    assert re.search(r"^results=\d failed=0 accuracy=", out, re.M), out  # the running line
    assert re.search(r"^results\s+3 \(0 failed\)", out, re.M), out
    assert re.search(r"^accuracy\s+n/a \(0/0 labelled\)", out, re.M), out  # no labels in metadata


@pytest.mark.data
def test_send_images_reports_an_unreachable_gateway(fashion_mnist_dir: Path) -> None:
    """Nothing listening: every image fails with connection_error, exit 1, the summary says what to check."""
    result = fmnist(
        "send-images", "--url", f"http://127.0.0.1:{free_port()}", "--count", "2",
        "--data-dir", str(fashion_mnist_dir), "--no-progress",
    )  # fmt: skip
    assert result.returncode == 1
    assert "accepted 0, failed 2" in result.stdout
    assert "connection_error=2" in result.stdout and "fmnist serve" in result.stdout


def test_send_images_explains_missing_data(tmp_path: Path) -> None:
    """An explicit --data-dir without the files fails, saying where it looked and how to get them."""
    result = fmnist("send-images", "--data-dir", str(tmp_path), "--count", "1")
    assert result.returncode != 0
    assert (
        str(tmp_path) in result.stderr and "apt-get install dataset-fashion-mnist" in result.stderr
    )


def test_idx_reader_refuses_other_files(tmp_path: Path) -> None:
    """A gzip file that is not an IDX image file is refused with a clear message, not misread."""
    bogus = tmp_path / "t10k-images-idx3-ubyte.gz"
    bogus.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 12))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(SystemExit, match="not an IDX image file"):
        load_test_set(tmp_path)


def test_idx_reader_refuses_truncated_files(tmp_path: Path) -> None:
    """An IDX file shorter than its header promises is refused, not reshaped into garbage."""
    truncated = tmp_path / "t10k-images-idx3-ubyte.gz"
    header = IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"".join(
        n.to_bytes(4, "big") for n in (10, 28, 28)
    )
    truncated.write_bytes(gzip.compress(header + b"\x00" * 100))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(SystemExit, match="truncated"):
        load_test_set(tmp_path)


@pytest.mark.data
def test_idx_reader_reads_the_real_test_set(fashion_mnist_dir: Path) -> None:
    """The real test images read as 10000×28×28 uint8."""
    images = read_idx(fashion_mnist_dir / "t10k-images-idx3-ubyte.gz", IDX_IMAGES_MAGIC)
    assert images.shape == (10000, 28, 28) and str(images.dtype) == "uint8"


def test_listen_latency_line_uses_the_shared_percentiles() -> None:
    """`fmnist listen` prints the percentiles of ml.runner_stats (one helper for the project)."""
    values = [float(v) for v in range(1, 101)]
    line = _latency_line("service", values, "gateway to result")
    expected = np.percentile(values, [50, 90, 99])
    assert f"p50 {expected[0]:.1f}  p90 {expected[1]:.1f}  p99 {expected[2]:.1f}" in line
    assert "n/a" in _latency_line("service", [], "gateway to result")


def _result(label: int, true_label: str | None, status: str = "completed") -> Prediction:
    metadata = (
        {"label": true_label, "sent_at": f"{time.time() - 0.05:.6f}"}
        if true_label is not None
        else {}
    )
    return Prediction(
        request_id="r", status=status,  # type: ignore[arg-type]
        label=label if status == "completed" else None,
        queue_ms=1.0, inference_ms=2.0, batch_size=4, metadata=metadata,
    )  # fmt: skip


def test_listen_stats_score_only_labelled_results() -> None:
    """Accuracy counts results whose metadata has a label; failures and unlabelled ones are not scored."""
    stats = ListenStats()
    for prediction in [
        _result(3, "3"),
        _result(1, "2"),
        _result(5, None),
        _result(0, "0", status="failed"),
    ]:
        stats.add(prediction, received_at=time.monotonic(), now_unix=time.time())
    assert (stats.results, stats.failed, stats.labelled, stats.correct) == (4, 1, 2, 1)
    assert stats.accuracy == 0.5
    assert stats.service_ms == [3.0, 3.0, 3.0]
    assert len(stats.end_to_end_ms) == 2 and all(40 <= ms <= 1000 for ms in stats.end_to_end_ms)


async def test_send_images_paces_and_labels_every_request() -> None:
    """send_images() submits each chosen image once, at no more than --rate per second, with
    {"label", "index", "sent_at"} metadata matching the image it carries."""
    images = np.stack([np.full((28, 28), i, dtype=np.uint8) for i in range(30)])
    labels = np.arange(30) % 10
    seen: list[tuple[dict[str, str], int]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        pixels = np.asarray(Image.open(io.BytesIO(request.content)))
        seen.append((json.loads(request.headers["X-Fmnist-Metadata"]), int(pixels[0, 0])))
        return httpx.Response(202, json={"request_id": f"r{len(seen)}", "status": "pending"})

    summary = SendSummary()
    started = time.monotonic()
    async with AsyncClient("http://fmnist.test", transport=httpx.MockTransport(answer)) as client:
        await send_images(
            client,
            images,
            labels,
            [5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
            rate=100,
            concurrency=4,
            summary=summary,
        )
    elapsed = time.monotonic() - started
    assert (summary.sent, summary.accepted, sum(summary.failures.values())) == (10, 10, 0)
    assert elapsed >= 0.09  # 10 images at 100/s: the last leaves 90 ms after the first
    assert sorted(int(meta["index"]) for meta, _ in seen) == list(range(5, 15))
    for meta, pixel in seen:
        assert int(meta["index"]) == pixel and meta["label"] == str(pixel % 10)
        assert abs(float(meta["sent_at"]) - time.time()) < 10


def test_listen_with_a_wrong_key_exits_1_with_the_reason(
    live_server: Callable[..., LiveServer],
) -> None:
    """A refused stream ends listen at once with exit 1 and the server's error, not a retry loop."""
    server = live_server(api_keys="right")
    result = fmnist("listen", "--url", server.url, "--api-key", "wrong")
    assert result.returncode == 1
    assert "invalid API key" in result.stderr and "code=forbidden" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("command", ["send-images", "listen"])
def test_commands_without_the_sdk_say_how_to_install_it(command: str) -> None:
    """With `fmnist_client` missing (a `make run` install), the command exits with the pip command."""
    code = (
        "import sys\n"
        "sys.modules['fmnist_client'] = None  # as if not installed\n"
        "from app.cli import main\n"
        f"sys.exit(main([{command!r}]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
    )
    assert result.returncode == 1
    assert (
        f"fmnist {command} needs the Python SDK: run `pip install ./clients/python`"
        in result.stderr
    )


def test_listen_to_an_unreachable_url_says_so_and_gives_up() -> None:
    """Nothing at --url: listen prints connecting, cannot connect, retrying in N s, never
    "connected"/"listening", and exits 1 once --give-up-after has passed."""
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = fmnist("listen", "--url", url, "--give-up-after", "2")
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == f"fmnist listen: connecting to {url} ..."
    assert lines[1].startswith(f"fmnist listen: cannot connect to {url}: ")
    assert re.fullmatch(r"fmnist listen: retrying in [\d.]+ s", lines[2]), lines
    assert lines[-1].startswith(f"fmnist listen: gave up: no ready gateway at {url} within 2 s")
    assert "connected" not in result.stderr and "listening" not in result.stderr
    assert result.stdout == "" and elapsed < CLI_TIMEOUT_S / 2


def test_listen_to_a_gateway_without_its_broker_says_it_is_not_ready() -> None:
    """A gateway whose Kafka broker is unreachable: listen says the gateway is up but not ready,
    with the broker's error, and exits 1 instead of listening to a stream that stays silent."""
    settings = sdk_settings(
        broker_url=f"kafka://127.0.0.1:{free_port()}", broker_connect_timeout_s=0.5
    )
    with LiveServer(service_app(settings, None)) as server:
        result = fmnist("listen", "--url", server.url, "--give-up-after", "1")
    assert result.returncode == 1, result.stderr
    assert f"cannot connect to {server.url}: the gateway is up but not ready: " in result.stderr
    assert "connected" not in result.stderr and result.stdout == ""
