"""The generation server as a privileged endpoint (issue 12 §2, decisions.md §16): the per-run
token, file loading only from inside the run dir, caps per request; in process against the
FastAPI app (httpx through Starlette's TestClient), then end to end through `ebft serve`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, child_env, wait_for_line
from ebft_engine.rollout.protocol import BASE_MODEL_NAME
from tinymodel import make_tiny_model

pytestmark = pytest.mark.timeout(300)

TOKEN = "s3cret-" + "k" * 40
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = dict(max_n=4, max_prompts=3, max_tokens=8, max_body_bytes=4096)
PROMPT = [1, 10, 11, 12]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("run")


@pytest.fixture(scope="module")
def client(tiny_model_dir, run_dir):
    from fastapi.testclient import TestClient

    from ebft_engine.rollout.guards import RequestLimits
    from ebft_engine.rollout.hf_engine import load_state
    from ebft_engine.rollout.hf_server import create_app

    state = load_state(str(tiny_model_dir), max_model_len=64, limits=RequestLimits(**LIMITS), load_root=run_dir)
    with TestClient(create_app(state, TOKEN)) as c:
        yield c


def completion(**over) -> dict:
    return {"model": BASE_MODEL_NAME, "prompt": [PROMPT], "n": 1, "max_tokens": 2, "logprobs": 0,
            "return_token_ids": True, **over}


# -- the token -------------------------------------------------------------------------------------

ROUTES = [("GET", "/version"), ("GET", "/v1/models"), ("GET", "/server_info"), ("GET", "/is_paused"),
          ("GET", "/weight_info"), ("POST", "/v1/completions"), ("POST", "/v1/load_lora_adapter"),
          ("POST", "/v1/unload_lora_adapter"), ("POST", "/collective_rpc"), ("POST", "/pause"),
          ("POST", "/resume"), ("POST", "/reset_prefix_cache"), ("POST", "/update_weight_version"),
          ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/no/such/route")]


@pytest.mark.parametrize("method, path", ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "])
def test_every_route_but_health_needs_the_token(client, method, path, header):
    headers = {"Authorization": header} if header is not None else {}
    r = client.request(method, path, headers=headers, json={})
    assert r.status_code == 401, (path, r.text)
    assert r.json()["error"]["code"] == 401 and r.headers["www-authenticate"] == "Bearer"
    assert TOKEN not in r.text


def test_health_is_open_and_the_token_opens_the_rest(client):
    assert client.get("/health").status_code == 200
    assert client.get("/v1/models", headers=AUTH).status_code == 200
    assert client.post("/pause", headers=AUTH).status_code == 200
    assert client.post("/resume", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    r = client.post("/v1/completions", headers=AUTH, json=completion())
    assert r.status_code == 200 and len(r.json()["choices"]) == 1


def test_a_server_without_a_token_refuses_to_start(tiny_model_dir, tmp_path):
    env = {k: v for k, v in child_env().items() if k != "EBFT_SERVER_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "ebft_engine.rollout.hf_server", "--model",
                           str(tiny_model_dir), "--port", "0"], env=env, cwd=str(REPO),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no token" in done.stderr and "Traceback" not in done.stderr


# -- files only from inside the run dir ---------------------------------------------------------


def _adapter(folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """A real adapter folder outside the run dir (so a leak of 'exists' would show)."""
    return _adapter(tmp_path_factory.mktemp("elsewhere") / "adapter")


def _escapes(run_dir: Path, outside: Path) -> list[str]:
    link = run_dir / "link-out"
    if not link.exists():
        link.symlink_to(outside)
    return [str(outside), str(outside.parent / "no-such-adapter"), str(run_dir / ".." / outside.parent.name /
            "adapter"), str(link), "/etc", "/proc/self/root/etc", "~/.ssh", "relative/../../adapter"]


def test_lora_paths_outside_the_run_dir_are_403_whether_they_exist_or_not(client, run_dir, outside):
    answers = set()
    for path in _escapes(run_dir, outside):
        r = client.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "x", "lora_path": path})
        assert r.status_code == 403, (path, r.text)
        answers.add(r.text)
    assert len(answers) == 1  # one answer for every path: existence does not show
    assert [m["id"] for m in client.get("/v1/models", headers=AUTH).json()["data"]] == [BASE_MODEL_NAME]


def test_weight_reloads_outside_the_run_dir_are_403(client, run_dir, outside):
    for path in _escapes(run_dir, outside):
        r = client.post("/collective_rpc", headers=AUTH,
                        json={"method": "reload_weights", "kwargs": {"weights_path": path}})
        assert r.status_code == 403, (path, r.text)


def test_inside_the_run_dir_loads_and_missing_is_404(client, run_dir):
    adapter = _adapter(run_dir / "lora-sync" / "v1")
    r = client.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "v1", "lora_path": str(adapter)})
    assert r.status_code == 200, r.text
    assert client.post("/v1/unload_lora_adapter", headers=AUTH, json={"lora_name": "v1"}).status_code == 200
    r = client.post("/v1/load_lora_adapter", headers=AUTH,
                    json={"lora_name": "v2", "lora_path": str(run_dir / "lora-sync" / "nothing")})
    assert r.status_code == 404
    r = client.post("/v1/load_lora_adapter", headers=AUTH, json={"lora_name": "v3", "lora_path": 7})
    assert r.status_code == 400


# -- caps per request ---------------------------------------------------------------------------


@pytest.mark.parametrize("over, key", [
    ({"n": 5}, "max_n_per_request"),
    ({"prompt": [PROMPT] * 4}, "max_prompts_per_request"),
    ({"max_tokens": 9}, "max_tokens_per_request"),
])
def test_requests_over_a_cap_are_400_naming_it(client, over, key):
    r = client.post("/v1/completions", headers=AUTH, json=completion(**over))
    assert r.status_code == 400
    assert f"vllm.{key}" in r.json()["error"]["message"]
    at_cap = {"n": 4, "prompt": [PROMPT] * 3, "max_tokens": 8}
    name = next(iter(over))
    assert client.post("/v1/completions", headers=AUTH,
                       json=completion(**{name: at_cap[name]})).status_code == 200


def test_a_body_over_the_cap_is_413_with_or_without_content_length(client):
    big = completion(prompt=[PROMPT * 1000])  # > 4096 bytes
    r = client.post("/v1/completions", headers=AUTH, json=big)
    assert r.status_code == 413 and "vllm.max_request_mb" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the cap holds while it streams in
        for _ in range(10):
            yield b" " * 1000
        yield b"{}"

    r = client.post("/v1/completions", headers=AUTH, content=chunks())
    assert r.status_code == 413


def test_caps_come_from_the_config():
    from ebft_engine.config import load_config
    from ebft_engine.rollout.guards import RequestLimits

    from ebft_engine.config import ConfigError

    raw = {"base_model": "m", "rl": "ebft", "datasets": [{"path": "d.jsonl"}], "micro_batch_size": 4,
           "trl": {"num_generations": 4, "max_completion_length": 96},
           "vllm": {"max_n_per_request": 8, "max_request_mb": 0.5}}
    limits = RequestLimits.from_config(load_config(raw))
    assert (limits.max_n, limits.max_prompts, limits.max_tokens, limits.max_body_bytes) == (8, 256, 96, 512 * 1024)
    for key, value in (("max_n_per_request", 3), ("max_tokens_per_request", 95), ("max_prompts_per_request", 1)):
        with pytest.raises(ConfigError, match=f"vllm.{key}"):  # below what the run itself asks
            load_config(raw, [f"vllm.{key}={value}"])
    assert RequestLimits.from_config(load_config(raw, ["vllm.max_prompts_per_request=2"])).max_prompts == 2


# -- end to end: `ebft serve` and the client -----------------------------------------------------


def write_config(tmp_path: Path, model_dir: Path, **vllm) -> Path:
    raw = {"base_model": str(model_dir), "rl": "ebft", "device": "cpu",
           "trl": {"num_generations": 2, "max_completion_length": 8, "vllm_server_port": 0},
           "vllm": {"backend": "hf", **vllm}, "datasets": [{"path": str(tmp_path / "data.jsonl")}],
           "micro_batch_size": 2, "output_dir": str(tmp_path / "run"), "bf16": False,
           "sequence_len": 64}
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi", "ground_truth": "yo"}\n')
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_ebft_serve_end_to_end_token_file_and_client(tiny_model_dir, tmp_path, outside, monkeypatch):
    from ebft_engine.rollout.client import GenerationClient, ServerError
    from ebft_engine.rollout.vllm_launcher import stop_server

    monkeypatch.delenv("EBFT_SERVER_TOKEN")
    env = {k: v for k, v in child_env().items() if k != "EBFT_SERVER_TOKEN"}
    cfg = write_config(tmp_path, tiny_model_dir, max_n_per_request=2)
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ebft_engine", "serve", str(cfg), "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(REPO), env=env, start_new_session=True)
    try:
        url = "http://127.0.0.1:" + wait_for_line(log, r"listening on http://127\.0\.0\.1:(\d+)", proc).group(1)
        token_file = tmp_path / "run" / "server.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 40

        with pytest.raises(ServerError, match="401"):
            GenerationClient(url, retries=0).models()
        client = GenerationClient(url, token=token)
        comps = client.completions([PROMPT], n=2, max_tokens=3, seed=1)
        assert len(comps) == 2
        with pytest.raises(ServerError, match="vllm.max_n_per_request"):
            client.completions([PROMPT], n=3, max_tokens=3)
        with pytest.raises(ServerError, match="403"):
            client.load_lora("x", str(outside))
        inside = _adapter(tmp_path / "run" / "lora-sync" / "ebft-policy-v1")
        client.load_lora("ebft-policy-v1", str(inside))
        assert token not in log.read_text()
    finally:
        stop_server(proc, grace_s=5)


def fake_vllm(tmp_path: Path) -> Path:
    """Records its argv and whether it got VLLM_API_KEY, then waits."""
    exe = tmp_path / "vllm"
    exe.write_text(f"#!{sys.executable}\nimport json, os, sys, time\n"
                   f"open({str(tmp_path / 'seen.json')!r}, 'w').write(json.dumps("
                   "{'argv': sys.argv, 'key': os.environ.get('VLLM_API_KEY')}))\n"
                   "time.sleep(120)\n")
    exe.chmod(0o755)
    return exe


def test_vllm_gets_the_token_as_vllm_api_key_never_on_its_command_line(tiny_model_dir, tmp_path):
    import json

    from ebft_engine.rollout.vllm_launcher import stop_server

    cfg = write_config(tmp_path, tiny_model_dir)
    env = {**child_env(), "EBFT_VLLM_EXECUTABLE": str(fake_vllm(tmp_path))}
    proc = subprocess.Popen([sys.executable, "-m", "ebft_engine", "serve", str(cfg), "vllm.backend=vllm"],
                            cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen_file = tmp_path / "seen.json"
        deadline = time.monotonic() + 120  # a hang guard
        while not seen_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.2)
        seen = json.loads(seen_file.read_text())
        assert seen["key"] == env["EBFT_SERVER_TOKEN"]
        assert not any(env["EBFT_SERVER_TOKEN"] in a for a in seen["argv"])
        assert (tmp_path / "run" / "server.token").read_text().strip() == env["EBFT_SERVER_TOKEN"]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=60)[0]
        stop_server(proc, grace_s=2)
    assert env["EBFT_SERVER_TOKEN"] not in out
    assert "$ " in out and "serve" in out


# -- the launcher: one token per run, through the environment only ----------------------------------


def test_the_launch_plan_hands_one_token_to_server_and_trainer_and_never_writes_it(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    import json

    from ebft_tui.runs.plan import build_plan

    monkeypatch.chdir(tmp_path)
    plan = build_plan(write_config(tmp_path, tiny_model_dir), [], [], tmp_path / "r")
    server, trainer = plan.server, plan.trainer
    token = server.env["EBFT_SERVER_TOKEN"]
    assert len(token) >= 40 and trainer.env["EBFT_SERVER_TOKEN"] == token
    assert token not in " ".join(server.argv + trainer.argv)
    assert build_plan(write_config(tmp_path, tiny_model_dir), [], [], tmp_path / "r2").server.env[
        "EBFT_SERVER_TOKEN"] != token  # per run
    for name in ("command.txt", "env.json", "config.yaml"):
        assert token not in (tmp_path / "r" / name).read_text(), name
    assert json.loads((tmp_path / "r" / "env.json").read_text())["processes"]["server"]["EBFT_SERVER_TOKEN"] == "***"


@pytest.mark.slow
def test_a_headless_structured_run_leaves_the_token_only_in_server_token(tiny_model_dir, tmp_path, monkeypatch):
    """`ebft run --headless`: server and trainer authenticate with the run's token, and no log, record
    or file of the run dir but server.token (0600) holds it."""
    monkeypatch.delenv("EBFT_SERVER_TOKEN")
    cfg = write_config(tmp_path, tiny_model_dir)
    raw = yaml.safe_load(cfg.read_text())
    raw.update(max_steps=2, adapter="lora", lora_r=8)  # a LoRA sync after step 1
    raw["trl"].update(vllm_lora_sync=True)
    cfg.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    env = {k: v for k, v in child_env().items() if k != "EBFT_SERVER_TOKEN"}
    done = subprocess.run([sys.executable, "-m", "ebft_tui", "run", "--headless", str(cfg), f"output_dir={run}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr
    token_file = run / "server.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip().encode()
    checked = [p for p in run.rglob("*") if p.is_file() and p != token_file]
    assert {p.name for p in checked} >= {"metrics.jsonl", "trainer.log", "server.log", "command.txt", "env.json"}
    assert [p for p in checked if token in p.read_bytes()] == []
    assert token.decode() not in done.stdout + done.stderr
    assert "load_lora_adapter name=ebft-policy-v1" in (run / "server.log").read_text()
