"""`deepseek-v3 serve` and `transformers serve` over real HTTP on 127.0.0.1: which class serves the model, and the
OpenAI-compatible endpoints (completion, chat, streaming, concurrent requests) with continuous batching.

Each server is a subprocess started through a small driver script that records which package's DeepSeek-V3 classes
run a forward, and whether an MTP module drafts (a torch global forward hook in the model's process), and runs the
command line under test; it is stopped by its process id.
"""

import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from transformers.utils.import_utils import is_serve_available

from modeling_deepseek_v3 import DeepseekV3ForCausalLM
from modeling_deepseek_v3.checkpoint import write_remote_code
from modeling_deepseek_v3.transformers_patch import PATCH_ENV_VAR

from ..utils import random_model, spread_routing, word_tokenizer

if not is_serve_available():
    pytest.skip('transformers serve needs its serving extra: pip install "transformers[serving]"',
                allow_module_level=True)

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def serve_logs_requests() -> bool:
    """Whether the installed `transformers serve` has `--enable-log-requests` (5.25 on; 5.24 has not), whose request
    log line says how a request ran (continuous batching or not)."""
    if not is_serve_available():
        return False
    from transformers.cli.serve import Serve

    return "enable_log_requests" in inspect.signature(Serve.__init__).parameters


LOGS_REQUESTS = serve_logs_requests()
OURS, BUILTIN = "modeling_deepseek_v3", "transformers"  # the packages that define the classes
STARTUP_SECONDS, REQUEST_SECONDS = 240, 120

# The driver script, run as `python driver.py RECORD_FILE COMMAND ARGS...`, COMMAND one of `deepseek-v3`,
# `transformers` (as the `transformers` command) and `transformers-after-import` (the same, in a script that imports
# this package). serve loads the model in a process it spawns, which runs this file again as `__mp_main__` (as it
# would the command's script): the top level installs the hook and imports what those scripts import.
DRIVER = textwrap.dedent("""
    import sys, torch

    record_file, command, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    seen = set()

    def record(module, inputs):
        name = type(module).__name__
        what = type(module).__module__.split(".")[0] if name.startswith("DeepseekV3") else name
        if what not in seen and (name.startswith("DeepseekV3") or name == "MTPLayer"):
            seen.add(what)
            with open(record_file, "a") as f:
                f.write(what + "\\n")

    torch.nn.modules.module.register_module_forward_pre_hook(record)
    if command == "deepseek-v3":
        from modeling_deepseek_v3_cli import main  # what the `deepseek-v3` script imports
    else:
        if command == "transformers-after-import":
            import modeling_deepseek_v3  # the Auto classes; DEEPSEEK_V3_PATCH_TRANSFORMERS decides the patch
        from transformers.cli.transformers import app  # what the `transformers` command runs

    if __name__ == "__main__":
        sys.exit(main(args) if command == "deepseek-v3" else app(args=args, prog_name="transformers"))
""")


class Server:
    def __init__(self, tmp_path, command: str, args: list[str], patch_env: str | None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.record = tmp_path / "classes.txt"
        self.log = tmp_path / "server.log"
        driver = tmp_path / "driver.py"
        driver.write_text(DRIVER)
        env = {k: v for k, v in os.environ.items() if k != PATCH_ENV_VAR}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
        if patch_env is not None:
            env[PATCH_ENV_VAR] = patch_env
        argv = [sys.executable, str(driver), str(self.record), command, "serve", *args,
                "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
                *(["--enable-log-requests"] if LOGS_REQUESTS else [])]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._wait_until_healthy()

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        self.stop()
        pytest.fail(f"the server did not start in {STARTUP_SECONDS} s:\n{self.log.read_text()[-3000:]}")

    def post(self, path: str, body: dict):
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=REQUEST_SECONDS)

    def post_json(self, path: str, body: dict) -> dict:
        with self.post(path, body) as response:
            return json.loads(response.read())

    def post_stream(self, path: str, body: dict) -> list[dict]:
        """The `data:` events of a streamed answer, up to `[DONE]`."""
        events = []
        with self.post(path, {**body, "stream": True}) as response:
            for line in response:
                line = line.decode().strip()
                if line == "data: [DONE]":
                    break
                if line.startswith("data: "):
                    events.append(json.loads(line[len("data: "):]))
        return events

    def classes(self) -> list[str]:
        return self.record.read_text().split() if self.record.exists() else []

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny model whose experts depend on the token, and a word tokenizer, saved as one folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("served")
    spread_routing(random_model()).save_pretrained(path)
    word_tokenizer().save_pretrained(path)
    return path


def greedy_words(folder, prompt: str, max_new_tokens: int) -> list[str]:
    """The words plain greedy `generate` of this package continues `prompt` with (up to EOS, `w001`)."""
    model = DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    ids = word_tokenizer()(prompt, return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    return [f"w{i:03d}" for i in new if i != 1]


@pytest.fixture(scope="module")
def deepseek_v3_server(folder, tmp_path_factory):
    args = [str(folder), "--continuous-batching", "--cb-num-blocks", "64", "--cb-block-size", "16",
            "--cb-max-batch-tokens", "128"]
    server = Server(tmp_path_factory.mktemp("server"), "deepseek-v3", args, patch_env=None)
    yield server
    server.stop()


def test_deepseek_v3_serve_completes_with_our_class_in_continuous_batching(deepseek_v3_server, folder):
    body = {"model": str(folder), "prompt": "w005 w009 w017", "max_tokens": 6, "temperature": 0}
    answer = deepseek_v3_server.post_json("/v1/completions", body)
    assert answer["choices"][0]["text"].split() == greedy_words(folder, "w005 w009 w017", 6)
    assert deepseek_v3_server.classes() == [OURS]
    if LOGS_REQUESTS:  # the request log line says how it ran
        assert "continuous batching" in deepseek_v3_server.log.read_text()


def test_deepseek_v3_serve_streams_chat_and_serves_concurrent_requests(deepseek_v3_server, folder):
    chat = {"model": str(folder), "messages": [{"role": "user", "content": "w007 w008"}], "max_tokens": 5,
            "temperature": 0}
    whole = deepseek_v3_server.post_json("/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    events = deepseek_v3_server.post_stream("/v1/chat/completions", chat)
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert len(events) > 2 and streamed == whole and whole.split()  # several chunks, the same text, not empty

    prompts = ["w011 w012", "w040 w041 w042", "w099", "w200 w201 w202 w203"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda p: deepseek_v3_server.post_json(
            "/v1/completions", {"model": str(folder), "prompt": p, "max_tokens": 5, "temperature": 0}), prompts))
    for prompt, answer in zip(prompts, answers):
        assert answer["choices"][0]["text"].split() == greedy_words(folder, prompt, 5), prompt
    assert deepseek_v3_server.classes() == [OURS]


def test_deepseek_v3_serve_fails_a_bad_request_alone_in_continuous_batching(deepseek_v3_server, folder):
    """An empty prompt (the word tokenizer adds no BOS) is refused as its own request while concurrent requests are
    answered, and the batch goes on serving. transformers serve answers the failed request with a bare HTTP 500 and
    logs the reason (the request's error from the batching manager)."""
    def complete(prompt: str):
        body = {"model": str(folder), "prompt": prompt, "max_tokens": 4, "temperature": 0}
        try:
            return deepseek_v3_server.post_json("/v1/completions", body)["choices"][0]["text"].split()
        except urllib.error.HTTPError as error:
            return error.code

    prompts = ["w021 w022", "", "w300 w301 w302"]
    with ThreadPoolExecutor(3) as pool:
        good, empty, other = pool.map(complete, prompts)
    assert empty == 500
    assert re.search(r"request '[^']+': input_ids is empty: a prompt needs at least one token",
                     deepseek_v3_server.log.read_text())  # fmt: skip
    assert good == greedy_words(folder, prompts[0], 4) and other == greedy_words(folder, prompts[2], 4)
    assert complete("w050") == greedy_words(folder, "w050", 4)


@pytest.fixture(scope="module")
def remote_code_folder(folder, tmp_path_factory):
    """The folder with `auto_map` and the code file that imports this package (`deepseek-v3 remote-code`)."""
    path = tmp_path_factory.mktemp("remote")
    shutil.copytree(folder, path, dirs_exist_ok=True)
    write_remote_code(path)
    return path


@pytest.mark.parametrize(
    "how, patch_env, expected",
    [("after-import", None, BUILTIN), ("after-import", "1", OURS), ("remote-code", None, BUILTIN),
     ("remote-code", "1", OURS)],
    ids=["imported-plain", "imported-patched", "remote-code-plain", "remote-code-patched"],
)
def test_transformers_serve_uses_our_class_only_with_the_patch(folder, remote_code_folder, tmp_path, how, patch_env,
                                                                 expected):
    """transformers' own serve command resolves `getattr(transformers, architecture)`: the built-in class, in a
    process that imported this package (after-import) and for a folder with `auto_map` under `--trust-remote-code`
    alike; ours once DEEPSEEK_V3_PATCH_TRANSFORMERS=1 has applied the patch. With the remote-code folder the command
    never imports the package itself: the folder's code file does, in the model's process, as serve reads the config."""
    if how == "after-import":
        command, model, extra = "transformers-after-import", folder, []
    else:
        command, model, extra = "transformers", remote_code_folder, ["--trust-remote-code"]
    server = Server(tmp_path, command, [str(model), *extra], patch_env=patch_env)
    try:
        body = {"model": str(model), "prompt": "w005 w009 w017", "max_tokens": 3, "temperature": 0}
        answer = server.post_json("/v1/completions", body)
        assert answer["choices"][0]["text"].split() == greedy_words(folder, "w005 w009 w017", 3)
        assert server.classes() == [expected]
    finally:
        server.stop()


def test_deepseek_v3_serve_decodes_with_use_mtp_on_request(mtp_folder, tmp_path):
    """Without continuous batching a request's `generation_config` reaches `generate()`: `use_mtp` drafts with the MTP
    module, and the answers, whole and streamed, are plain greedy decoding's."""
    server = Server(tmp_path, "deepseek-v3", [str(mtp_folder)], patch_env=None)
    try:
        expected = greedy_words(mtp_folder, "w005 w009 w017", 8)
        body = {"model": str(mtp_folder), "prompt": "w005 w009 w017", "max_tokens": 8, "temperature": 0,
                "generation_config": json.dumps({"use_mtp": True})}
        assert server.post_json("/v1/completions", body)["choices"][0]["text"].split() == expected
        events = server.post_stream("/v1/completions", body)
        assert "".join(e["choices"][0].get("text") or "" for e in events if e.get("choices")).split() == expected
        assert server.classes() == [OURS, "MTPLayer"]
    finally:
        server.stop()


def test_deepseek_v3_serve_drafts_with_mtp_in_continuous_batching(mtp_folder, tmp_path):
    """A checkpoint whose generation config sets `use_mtp` (and `num_draft_tokens`) drafts with its MTP module inside
    `serve --continuous-batching`; concurrent answers are plain greedy decoding's."""
    folder = tmp_path / "model"
    shutil.copytree(mtp_folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "use_mtp": True, "num_draft_tokens": 2}))
    (tmp_path / "server").mkdir()
    server = Server(tmp_path / "server", "deepseek-v3", [str(folder), "--continuous-batching", "--cb-num-blocks", "64",
                                                         "--cb-block-size", "16"], patch_env=None)  # fmt: skip
    try:
        prompts = ["w005 w009 w017", "w011 w004", "w030 w031 w032 w033"]
        bodies = [{"model": str(folder), "prompt": prompt, "max_tokens": 8, "temperature": 0} for prompt in prompts]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda body: server.post_json("/v1/completions", body), bodies))
        for prompt, answer in zip(prompts, answers):
            assert answer["choices"][0]["text"].split() == greedy_words(mtp_folder, prompt, 8)
        assert server.classes() == [OURS, "MTPLayer"]
    finally:
        server.stop()
