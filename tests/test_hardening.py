"""Issue 18: run files are data (no endpoint, key or path they name is trusted), outputs never overwrite inputs,
one writer per run directory, damaged run files and inputs stop with one line naming the file (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Self

import pytest

from palr.core.errors import InputError, LLMUnavailable, RunError

SRC = str(Path(__file__).resolve().parents[1] / "src")


def palr_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """`palr ARGS` in a fresh process (exit code and stderr as a user sees them)."""
    full = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    full.pop("PALR_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "palr.cli", *args], capture_output=True, text=True, env=full,
                          timeout=timeout, check=False)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error: ")]  # retry warnings may come before it
    assert len(err) == 1 and lines[-1] == err[0], res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in err[0], err[0]
    return err[0]


# ---------------------------------------------------------------------------- a listener that records requests
class Recorder:
    """A tiny HTTP server on port 0 that records each request's path and headers and answers ``status``."""

    def __init__(self, status: int = 500) -> None:
        self.requests: list[dict[str, str]] = []
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                rec.requests.append({"path": self.path, "body": body.decode(errors="replace"),
                                     **{k.lower(): v for k, v in self.headers.items()}})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"error": "boom"}')

            do_GET = do_POST

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def retriever_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from palr.data.synthetic import synthetic_raw
    from palr.train.retriever import train_run

    tmp = tmp_path_factory.mktemp("hard")
    raw = synthetic_raw(40, 30, seed=3)
    lines = ["user,item,timestamp"] + [f"{u},{i},{int(t)}" for u, i, t in zip(raw.users, raw.items, raw.times)]
    (tmp / "inter.csv").write_text("\n".join(lines) + "\n")
    return train_run(f"csv:{tmp / 'inter.csv'}", "popularity", tmp / "retr", progress=False)


def csv_of(retriever_run: Path) -> str:
    return f"csv:{retriever_run.parent / 'inter.csv'}"


def palr_run_from(retriever_run: Path, dest: Path, ranking: dict) -> Path:
    """A PALR-kind run around a retriever run's model with the given ranking.json (a copied, edited run)."""
    shutil.copytree(retriever_run, dest)
    shutil.copytree(retriever_run / "model", dest / "retriever")
    meta = json.loads((dest / "run.json").read_text())
    (dest / "run.json").write_text(json.dumps({**meta, "kind": "palr"}))
    base = {"mode": "verbalizer", "style": "text", "weight": 0.0, "fusion": "rank", "n_candidates": 10,
            "history_len": 10, "profiles": False, "profiler": "attributes"}
    (dest / "ranking.json").write_text(json.dumps({**base, **ranking}))
    return dest


def first_user(run: Path) -> str:
    from palr.rank.pipeline import PALR

    return PALR.load(run, llm="openai:x@http://127.0.0.1:9/v1").split.dataset.user_ids[0]


# ---------------------------------------------------------------------------- 1. a run names an endpoint
def test_a_hostile_ranking_json_gets_no_key_and_no_silent_success(retriever_run: Path, tmp_path: Path) -> None:
    user = first_user(retriever_run)
    key = {"OPENAI_API_KEY": "sk-secret-do-not-send"}
    with Recorder(status=500) as srv:
        run = palr_run_from(retriever_run, tmp_path / "hostile", {"llm": f"openai:gpt@{srv.url}"})
        # the run names the endpoint: refused before anything is sent
        one_line_error(palr_cli("recommend", "--run", str(run), "--user", user, env=key), "ranking.json",
                       "--trust-run-llm")
        assert srv.requests == []
        # confirmed: requests go there, without the user's key; the server's 500 is loud (exit 2), not a fallback
        one_line_error(palr_cli("recommend", "--run", str(run), "--user", user, "--trust-run-llm", env=key),
                       "HTTP 500")
        assert srv.requests and all("authorization" not in r for r in srv.requests)
        assert not any("sk-secret" in json.dumps(r) for r in srv.requests)
        # a fallback the user allowed: exit 0, said so
        n = len(srv.requests)
        res = palr_cli("recommend", "--run", str(run), "--user", user, "--trust-run-llm", "--allow-fallback",
                       env=key)
        assert res.returncode == 0 and "retriever" in res.stdout, res.stderr[-2000:]
        assert all("authorization" not in r for r in srv.requests[n:])
        # the endpoint the user names gets the key (that is what it is for)
        n = len(srv.requests)
        one_line_error(palr_cli("recommend", "--run", str(run), "--user", user, "--llm", f"openai:gpt@{srv.url}",
                                env=key), "HTTP 500")
        assert srv.requests[n:] and srv.requests[n]["authorization"] == "Bearer sk-secret-do-not-send"


def test_a_profiler_llm_named_by_the_run_is_refused(retriever_run: Path, tmp_path: Path) -> None:
    from palr.rank.pipeline import PALR

    run = palr_run_from(retriever_run, tmp_path / "p", {"llm": "", "base_model": "mini", "llm_dir": "llm",
                                                         "profiler": "llm:openai:gpt@http://127.0.0.1:9/v1"})
    (run / "llm").mkdir()
    with pytest.raises(RunError, match="names the LLM"):
        from palr.rank.llm_ranker import RankingConfig

        RankingConfig.read(run).profiler_spec(run)
    with pytest.raises(RunError):
        PALR.load(run)


def test_a_remote_500_is_unavailable_not_a_silent_fallback() -> None:
    from palr.llm.openai import OpenAILLM

    with Recorder(status=500) as srv:
        llm = OpenAILLM("m", srv.url, max_retries=1, backoff=0.01)
        with pytest.raises(LLMUnavailable, match="HTTP 500"):
            llm.generate(["hello"], max_new_tokens=2)
        assert len(srv.requests) == 2


@pytest.mark.parametrize("ranking", [
    {"ranker": "features", "ranker_dir": "../../../etc"},
    {"ranker": "features", "ranker_dir": "/etc"},
    {"llm": "", "base_model": "mini", "llm_dir": "../retr"},
    {"llm": "mini:/tmp"},
    {"llm": "hf:../../x"},
])
def test_every_path_a_run_names_stays_inside_it(retriever_run: Path, tmp_path: Path, ranking: dict) -> None:
    from palr.rank.pipeline import PALR

    run = palr_run_from(retriever_run, tmp_path / "r", ranking)
    with pytest.raises(RunError, match="outside the run directory"):
        PALR.load(run)


def test_inside_run_follows_links(tmp_path: Path) -> None:
    from palr.runs.safety import inside_run

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ok").mkdir()
    (tmp_path / "run" / "out").symlink_to(tmp_path)
    assert inside_run(tmp_path / "run", "ok") == (tmp_path / "run" / "ok").resolve()
    with pytest.raises(RunError):
        inside_run(tmp_path / "run", "out/secret")
    with pytest.raises(RunError):
        inside_run(tmp_path / "run", "")


def test_a_hub_id_a_run_names_is_never_downloaded(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from palr.core.errors import PalrError
    from palr.llm.registry import load_llm
    from palr.llm.trust import run_llm_spec, run_model_spec

    (tmp_path / "adapter").mkdir()
    spec, opts = run_model_spec(tmp_path, "someone/some-model", "adapter", lora=True)
    assert spec == "hf:someone/some-model" and opts["offline"] is True
    assert run_llm_spec(tmp_path, "hf:gpt2")[1] == {"offline": True}
    with pytest.raises(PalrError, match="does not download"):
        load_llm("hf:palr-test-nobody/no-such-model-xyz", offline=True)


# ---------------------------------------------------------------------------- 2. outputs never overwrite inputs
def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_evaluate_refuses_outputs_inside_the_run(retriever_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(retriever_run, run)
    before = snapshot(run)
    one_line_error(palr_cli("evaluate", "--run", str(run), "--out", str(run / "config.json")), "--out",
                   "inside the input run")
    one_line_error(palr_cli("evaluate", "--run", str(run), "--out", str(tmp_path / "r.json"), "--predictions",
                            str(run / "model" / "weights.safetensors")), "--predictions")
    one_line_error(palr_cli("evaluate", str(run), "--out", str(tmp_path / "r.json"), "--per-user",
                            str(run / "." / "model" / ".." / "u.csv")), "--per-user")
    assert snapshot(run) == before
    one_line_error(palr_cli("evaluate", "--run", str(run), "--out", str(tmp_path)), "is a directory")
    one_line_error(palr_cli("report", str(run), "--out", str(run / "report.html")), "inside the input run")
    assert snapshot(run) == before


def test_check_outputs_cases(tmp_path: Path) -> None:
    from palr.runs.safety import check_outputs

    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    check_outputs({"--out": tmp_path / "new" / "r.json", "--predictions": None}, [run])
    with pytest.raises(InputError, match="inside the input run"):
        check_outputs({"--out": run / "sub" / "x.json"}, [run])
    with pytest.raises(InputError, match="inside the input run"):  # a run directory must not hold its input
        check_outputs({"--out": tmp_path}, [run], directories=["--out"])
    with pytest.raises(InputError, match="existing file, not a directory"):
        check_outputs({"--out": tmp_path / "file"}, directories=["--out"])
    with pytest.raises(InputError, match="is a file, not a directory"):
        check_outputs({"--out": tmp_path / "file" / "r.json"})
    (run / "link.json").symlink_to(run / "config.json")
    with pytest.raises(InputError):
        check_outputs({"--out": run / "link.json"}, [run])


def test_a_read_only_output_directory_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from palr.runs.safety import check_outputs

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root may write anywhere: see the directory as another user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: real(p, mode) and not (
            Path(p) == ro and mode & os.W_OK))
    try:
        with pytest.raises(InputError, match="not writable"):
            check_outputs({"--out": ro / "r.json"})
        with pytest.raises(InputError, match="not writable"):
            check_outputs({"--out": ro / "run"}, directories=["--out"])
    finally:
        ro.chmod(0o755)


def test_train_out_an_existing_file_is_one_line(retriever_run: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("keep me")
    one_line_error(palr_cli("train", "--dataset", csv_of(retriever_run), "-r", "popularity", "--out", str(tmp_path / "f")),
                   "existing file")
    assert (tmp_path / "f").read_text() == "keep me"


# ---------------------------------------------------------------------------- 3. one writer per run directory
def test_a_second_writer_is_refused_while_a_job_holds_the_run(retriever_run: Path, tmp_path: Path) -> None:
    from palr.runs.safety import RunLock
    from palr.train.retriever import train_run

    run = tmp_path / "x"
    shutil.copytree(retriever_run, run)
    before = snapshot(run)
    spec = json.loads((run / "args.json").read_text())
    with RunLock(run):  # another job (another open file: flock refuses it even inside this process)
        one_line_error(palr_cli("train", "--dataset", csv_of(retriever_run), "-r", "popularity", "--out", str(run),
                                "--overwrite"), "being written by another job", f"pid {os.getpid()}")
        with pytest.raises(RunError, match="another job"):
            train_run(csv_of(retriever_run), "itemknn", run, overwrite=True, progress=False)
    assert snapshot(run) == before  # nothing deleted, nothing written
    assert spec["retriever"] == "popularity"
    out = train_run(csv_of(retriever_run), "popularity", tmp_path / "y", progress=False)  # free once released
    assert (out / "run.json").exists() and (out / ".lock").exists()
    train_run(csv_of(retriever_run), "itemknn", out, overwrite=True, progress=False)  # the lock survives --overwrite
    assert json.loads((out / "config.json").read_text())["config"]["retriever"] == "itemknn"
    with RunLock(out):
        pass  # released at finish_run


def test_the_lock_is_held_by_a_live_process(tmp_path: Path) -> None:
    """Two processes: one holds RUN/.lock (as a training job does); the other is refused, then gets it."""
    from palr.runs.safety import RunLock

    code = ("import sys,time; sys.path.insert(0, {!r}); from palr.runs.safety import lock_run; lock_run({!r}); "
            "print('held', flush=True); time.sleep(30)").format(SRC, str(tmp_path / "run"))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=f"pid {holder.pid}"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()
    with RunLock(tmp_path / "run"):  # the kernel released it with the process
        pass


# ---------------------------------------------------------------------------- 4. damaged run files: one line
@pytest.fixture(scope="module")
def feature_run(retriever_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lightgbm")
    from palr.rank.trees import FeatureRankerConfig
    from palr.train.trees import train_feature_run

    out = tmp_path_factory.mktemp("feat") / "f"
    return train_feature_run(retriever_run, out, FeatureRankerConfig(n_candidates=20, text_encoder="tfidf",
                                                                      rounds=5, min_data_in_leaf=2))


def damaged_copy(run: Path, dest: Path, rel: str, keep: float = 0.5, text: str | None = None) -> Path:
    shutil.copytree(run, dest)
    f = dest / rel
    if text is not None:
        f.write_text(text)
    else:
        data = f.read_bytes()
        f.write_bytes(data[:int(len(data) * keep)])
    return dest


def test_half_a_trees_file_is_one_line_not_an_abort(feature_run: Path, tmp_path: Path) -> None:
    from palr.rank.pipeline import PALR

    user = PALR.load(feature_run).split.dataset.user_ids[0]
    run = damaged_copy(feature_run, tmp_path / "half", "ranker/trees.txt")
    one_line_error(palr_cli("recommend", "--run", str(run), "--user", user), "trees.txt", "damaged LightGBM model")
    one_line_error(palr_cli("evaluate", "--run", str(run), "--out", str(tmp_path / "r.json")), "trees.txt")


def test_every_truncation_of_a_trees_file_is_refused(feature_run: Path) -> None:
    from palr.rank.trees import check_model_text

    text = (feature_run / "ranker" / "trees.txt").read_text()
    check_model_text(text)
    end = text.index("\nend of parameters")
    for cut in range(0, end, max(1, end // 400)):
        with pytest.raises(RunError, match="damaged LightGBM model"):
            check_model_text(text[:cut])
    lines = text.split("\n")
    i = next(k for k, ln in enumerate(lines) if ln.startswith("left_child="))
    cyclic = lines[:i] + ["left_child=" + " ".join("0" for _ in lines[i].split("=")[1].split())] + lines[i + 1:]
    with pytest.raises(RunError, match="structure|damaged"):  # a loop LightGBM would follow forever
        check_model_text("\n".join(cyclic))


@pytest.mark.parametrize(("rel", "needle"), [
    ("run.json", "run.json:1: damaged JSON"),
    ("config.json", "config.json"),
    ("ranking.json", "ranking.json"),
    ("retriever/retriever.json", "retriever.json"),
    ("retriever/weights.safetensors", "weights.safetensors is damaged"),
])
def test_damaged_run_files_are_one_line_naming_the_file(retriever_run: Path, tmp_path: Path, rel: str,
                                                        needle: str) -> None:
    user = first_user(retriever_run)
    src = palr_run_from(retriever_run, tmp_path / "src", {"llm": "openai:m@http://127.0.0.1:9/v1"})
    run = damaged_copy(src, tmp_path / "bad", rel, keep=0.6)
    one_line_error(palr_cli("recommend", "--run", str(run), "--user", user, "--llm", "openai:m@http://127.0.0.1:9/v1",
                            "--allow-fallback"), needle)


def test_damaged_loaders_raise_run_errors(retriever_run: Path, tmp_path: Path) -> None:
    from palr.retrieval.base import load_retriever
    from palr.runs.safety import load_npz, read_json

    run = damaged_copy(retriever_run, tmp_path / "a", "model/retriever.json", text='{"name": "nope"}')
    with pytest.raises(RunError, match="retriever.json"):
        load_retriever(run / "model")
    run = damaged_copy(retriever_run, tmp_path / "b", "model/retriever.json", text='{"name": "popularity", "x": 1}')
    (run / "model" / "weights.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(RunError, match="damaged retriever files"):  # a valid file without the tensors
        load_retriever(run / "model")
    (run / "model" / "weights.safetensors").write_bytes(b"\xff" * 12)
    with pytest.raises(RunError, match="weights.safetensors is damaged"):
        load_retriever(run / "model")
    (tmp_path / "j.json").write_text('{"a": [1, 2,')
    with pytest.raises(RunError, match=r"j.json:1: damaged JSON"):
        read_json(tmp_path / "j.json")
    (tmp_path / "z.npz").write_bytes(b"PK\x03\x04broken")
    with pytest.raises(RunError, match="z.npz is damaged"):
        load_npz(tmp_path / "z.npz")


# ---------------------------------------------------------------------------- 5. items and user files
def interactions(tmp_path: Path, n_users: int = 20, n_items: int = 30) -> Path:
    lines = ["user,item,timestamp"] + [f"u{u},i{(u * 7 + k) % n_items},{1_000_000 + u * 100 + k}"
                                       for u in range(n_users) for k in range(6)]
    (tmp_path / "inter.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "inter.csv"


def items_lines(n: int = 30) -> list[str]:
    return ["item,title,genres"] + [f"i{k},Title {k},Drama|Comedy" for k in range(n)]


def read_with_items(tmp_path: Path, lines: list[str], name: str = "items.csv"):
    from palr.data.userfiles import read_user_file

    (tmp_path / name).write_text("\n".join(lines) + "\n")
    return read_user_file(interactions(tmp_path), "user", "item", "timestamp", tmp_path / name)


def test_an_unterminated_quote_stops_at_its_line(tmp_path: Path) -> None:
    from palr.core.errors import DataError

    lines = items_lines()
    lines[12] = 'i11,"unterminated,Drama'  # line 13
    with pytest.raises(DataError, match=r"items\.csv:13: unterminated quote"):
        read_with_items(tmp_path, lines)
    (tmp_path / "items.csv").write_text("\n".join(lines) + "\n")
    one_line_error(palr_cli("data", "stats", "--dataset", f"csv:{tmp_path / 'inter.csv'}", "--items-file",
                            str(tmp_path / "items.csv")), "items.csv:13")


@pytest.mark.parametrize(("line", "text", "needle"), [
    (6, "i4,Title 4", r"items\.csv:6: wrong number of fields: 2"),
    (8, "i6,Title 6,Drama,extra", r"items\.csv:8: wrong number of fields: 4"),
])
def test_short_and_long_item_rows_stop_with_their_line(tmp_path: Path, line: int, text: str, needle: str) -> None:
    from palr.core.errors import DataError

    lines = items_lines()
    lines[line - 1] = text
    with pytest.raises(DataError, match=needle):
        read_with_items(tmp_path, lines)


def test_a_huge_field_reports_the_line_its_row_starts_on(tmp_path: Path) -> None:
    from palr.core.errors import DataError
    from palr.data.userfiles import read_user_file

    lines = items_lines()
    lines[2] = 'i1,"two\nlines",Drama'  # a quoted newline before it: lines 3-4
    lines[9] = f'i8,"{"x" * (2 * 1024 * 1024)}",Drama'  # file line 11
    with pytest.raises(DataError, match=r"items\.csv:11: bad CSV: field larger"):
        read_with_items(tmp_path, lines)
    inter = interactions(tmp_path).read_text().split("\n")
    inter[9] = f'u1,"{"y" * (50 * 1024 * 1024)}",100'  # line 10 of the interactions
    (tmp_path / "big.csv").write_text("\n".join(inter))
    with pytest.raises(DataError, match=r"big\.csv:10: "):
        read_user_file(tmp_path / "big.csv", "user", "item", "timestamp")


def test_a_wrong_parquet_column_type_names_the_column(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    from palr.core.errors import DataError
    from palr.data.userfiles import read_user_file

    n = 60
    pq.write_table(pa.table({"user": [f"u{i % 10}" for i in range(n)], "item": [[i % 7] for i in range(n)],
                             "timestamp": list(range(n))}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x\.parquet: column 'item' has type list"):
        read_user_file(tmp_path / "x.parquet", "user", "item", "timestamp")
    pq.write_table(pa.table({"user": [f"u{i % 10}" for i in range(n)], "item": [f"i{i % 7}" for i in range(n)],
                             "timestamp": [{"a": i} for i in range(n)]}), tmp_path / "y.parquet")
    with pytest.raises(DataError, match="column 'timestamp' has type struct"):
        read_user_file(tmp_path / "y.parquet", "user", "item", "timestamp")


def test_out_of_range_times_stop_and_implausible_ones_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from palr.core.errors import DataError
    from palr.data.userfiles import read_user_file

    lines = interactions(tmp_path).read_text().split("\n")
    bad = list(lines)
    bad[4] = "u0,i1,1e300"
    (tmp_path / "huge.csv").write_text("\n".join(bad))
    with pytest.raises(DataError, match=r"huge\.csv:5: timestamp '1e300' is out of range"):
        read_user_file(tmp_path / "huge.csv", "user", "item", "timestamp")
    odd = list(lines)
    odd[3], odd[6], odd[7] = "u0,i1,-5", "u1,i2,99999999999999", "u1,i3,99999999999999"
    (tmp_path / "odd.csv").write_text("\n".join(odd))
    with caplog.at_level("WARNING"):
        read_user_file(tmp_path / "odd.csv", "user", "item", "timestamp")
    assert "1 negative and 2 after-2100 timestamp value(s)" in caplog.text and "line 4" in caplog.text
