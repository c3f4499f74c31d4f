"""The lminf command line on a tiny local model: outputs, their agreement, and bad input."""

import argparse
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lm_infinite.hf as lminf_hf
from lm_infinite.apps.cli import main
from lm_infinite.apps.eval.passkey import build_passkey_prompt
from lm_infinite.models import load_model
from lm_infinite.streaming import LambdaStream
from tiny_model_dir import TRAINING_LENGTH, save_tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("The grass is green. def f(x):\n    return x + 1\n" * 12)
    return path


def _run(*argv):
    return main([str(a) for a in argv])


def test_ppl_writes_a_table_json_and_plot_that_agree(model_dir, text_file, tmp_path, capsys):
    out_json, out_png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    status = _run("ppl", text_file, "--model", model_dir, "--tokens", 150, "--stride", 8,
                  "--chunk-size", 40, "--bucket", 50, "--n-global", 2, "--json", out_json,
                  "--plot", out_png, "--no-progress")
    assert status == 0
    assert "perplexity on tokens 32-150" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    nll = {m: torch.tensor([float("nan") if x is None else x for x in v]) for m, v in result["nll"].items()}
    assert set(nll) == {"stock", "truncated", "lm-infinite"} and result["n_tokens"] == 150
    assert {key: result["settings"][key] for key in ("n_global", "n_local", "distance_cap")} == {
        "n_global": 2, "n_local": TRAINING_LENGTH, "distance_cap": TRAINING_LENGTH}
    # Inside the window LM-Infinite is the stock model; the truncated baseline starts after it.
    torch.testing.assert_close(nll["lm-infinite"][1:TRAINING_LENGTH], nll["stock"][1:TRAINING_LENGTH],
                               atol=1e-3, rtol=0)
    assert torch.isnan(nll["truncated"][:TRAINING_LENGTH]).all()
    assert not torch.isnan(nll["truncated"][TRAINING_LENGTH:]).any()
    # The JSON's LM-Infinite NLL is the streaming API's.
    model, tokenizer = load_model(model_dir)
    ids = tokenizer(text_file.read_text(), return_tensors="pt").input_ids[:, :150]
    stream = LambdaStream(lminf_hf.enable(model, n_global=2), chunk_size=40)
    torch.testing.assert_close(nll["lm-infinite"][1:], stream.nll(ids)[0, 1:], atol=1e-3, rtol=0)
    assert [row["start"] for row in result["buckets"]] == [0, 50, 100]
    assert out_png.read_bytes().startswith(PNG_MAGIC)


def test_passkey_reports_every_trial(model_dir, tmp_path, capsys):
    out_json, out_png = tmp_path / "passkey.json", tmp_path / "passkey.png"
    top_k = dict(top_k_middle=3, top_k_first_layer=0, top_k_distance=8, top_k_rows=4)
    status = _run("passkey", "--model", model_dir, "--lengths", "160,240", "--depths", "0,1",
                  "--max-new-tokens", 3, "--json", out_json, "--plot", out_png, "--no-progress",
                  "--top-k", 3, "--top-k-first-layer", 0, "--top-k-distance", 8, "--top-k-rows", 4)
    assert status == 0
    table = capsys.readouterr().out
    assert all(method in table for method in ("stock", "truncated", "lm-infinite", "lm-infinite+top-k"))
    by_depth = table.split("length depth")[1].strip().splitlines()[1:]
    assert [line.split()[:2] for line in by_depth] == [["160", "0.00"], ["160", "1.00"], ["240", "0.00"], ["240", "1.00"]]
    result = json.loads(out_json.read_text())
    trials = result["trials"]
    assert len(trials) == 2 * 2 * 4
    assert all(t["prompt_tokens"] <= t["length"] for t in trials)
    assert {key: result["settings"][key] for key in top_k} == top_k
    assert out_png.read_bytes().startswith(PNG_MAGIC)
    # The top-k trial's continuation is what a stream with those options generates.
    trial = next(t for t in trials if t["method"] == "lm-infinite+top-k" and t["length"] == 240)
    model, tokenizer = load_model(model_dir)
    prompt = build_passkey_prompt(tokenizer, 240, trial["depth"], trial["key"])
    stream = LambdaStream(lminf_hf.enable(model, **top_k), chunk_size=2048)
    stream.feed(prompt.ids)
    assert trial["continuation"] == tokenizer.decode(list(stream.generate(3)), skip_special_tokens=True)


@pytest.mark.parametrize("options", [[], ["--compile"]])
def test_generate_prints_the_greedy_stream_continuation(model_dir, text_file, capsys, options):
    assert _run("generate", text_file, "--model", model_dir, "--max-new-tokens", 12, "--n-local", 16,
                *options) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_model(model_dir)
    stream = LambdaStream(lminf_hf.enable(model, n_local=16))
    stream.feed(tokenizer(text_file.read_text(), return_tensors="pt").input_ids)
    tokens = list(stream.generate(12, stop_token_ids=[tokenizer.eos_token_id]))
    assert printed == tokenizer.decode(tokens, skip_special_tokens=True) + "\n"


def test_generate_shows_its_progress_and_speeds_on_stderr(model_dir, text_file, capsys):
    """Loading says how long it took; reading the prompt shows a bar with tokens/s (unless
    --no-progress); the end reports prompt and decode speeds. stdout holds the continuation only."""
    assert _run("generate", text_file, "--model", model_dir, "--max-new-tokens", 5, "--n-local", 16,
                "--chunk-size", 8) == 0
    out, err = capsys.readouterr()
    n_prompt = len(load_model(model_dir)[1](text_file.read_text()).input_ids)
    assert "loading model" in err and "model loaded in" in err
    assert "reading the prompt" in err and f"{n_prompt}/{n_prompt}" in err and "tok/s" in err
    assert f"prompt: {n_prompt} tokens in " in err and " tokens/s); decode: " in err
    assert "reading the prompt" not in out and "tokens/s" not in out
    assert _run("generate", text_file, "--model", model_dir, "--max-new-tokens", 5, "--n-local", 16,
                "--no-progress") == 0
    out_quiet, err = capsys.readouterr()
    assert out_quiet == out
    assert "reading the prompt" not in err and f"prompt: {n_prompt} tokens in " in err


def _option_blocks(help_text: str) -> dict[str, str]:
    """{option string: its lines of --help, joined and whitespace-normalised}."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            names = stripped.split("  ")[0].split(", ")  # "-h, --help", "--port PORT"
            current = [o.split(" ")[0] for o in names]
            for option in current:
                blocks[option] = stripped
        elif current and line.startswith("    ") and stripped:
            for option in current:
                blocks[option] += " " + stripped
        else:
            current = None
    return {option: " ".join(text.split()) for option, text in blocks.items()}


@pytest.mark.parametrize("command", ["demo", "ppl", "passkey", "generate", "serve"])
def test_every_option_help_shows_its_default(command, capsys, monkeypatch):
    from lm_infinite.apps.cli import build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a default (lminf-demo.png)

    parser = build_parser()
    subparser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    blocks = _option_blocks(capsys.readouterr().out)
    checked = 0
    for action in subparser._actions:
        default = action.default
        if not action.option_strings or default is None or default is False or default is argparse.SUPPRESS:
            continue
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        text = blocks[action.option_strings[-1]]
        assert f"default: {shown}" in text, (action.option_strings, text)
        checked += 1
    assert checked >= 5


def test_generate_with_several_prompt_files_prints_each_continuation_as_alone(model_dir, text_file,
                                                                              tmp_path, capsys):
    """Prompt files of different lengths run as one batch; each continuation, under its file's
    name, is what the prompt gives alone."""
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n")
    assert _run("generate", text_file, short, "--model", model_dir, "--max-new-tokens", 9,
                "--n-local", 16, "--chunk-size", 24) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_model(model_dir)
    lminf_hf.enable(model, n_local=16)
    expected = []
    for path in (text_file, short):
        stream = LambdaStream(model, chunk_size=24)
        stream.feed(tokenizer(path.read_text(), return_tensors="pt").input_ids)
        tokens = list(stream.generate(9, stop_token_ids=[tokenizer.eos_token_id]))
        expected.append(f"=== {path} ===\n{tokenizer.decode(tokens, skip_special_tokens=True)}\n")
    assert printed == "\n".join(expected)


def test_demo_writes_its_table_json_and_plot_in_the_working_directory(model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _run("demo", "--model", model_dir, "--tokens", 80, "--no-progress") == 0
    out = capsys.readouterr().out
    assert "perplexity on tokens 32-80: stock" in out and "lm-infinite" in out
    result = json.loads((tmp_path / "lminf-demo.json").read_text())
    assert set(result["nll"]) == {"stock", "lm-infinite"}
    assert (tmp_path / "lminf-demo.png").read_bytes().startswith(PNG_MAGIC)


def _assert_fails(capsys, argv, message, outputs=()):
    assert _run(*argv) == 1
    assert message in capsys.readouterr().err
    for path in outputs:
        assert not Path(path).exists() and not list(Path(path).parent.glob(f".{Path(path).name}*"))


def test_bad_input_fails_cleanly_and_writes_nothing(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "out.json"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    not_a_model = tmp_path / "weights.gguf"
    not_a_model.write_bytes(b"not a gguf file at all")
    gpt2_dir = tmp_path / "gpt2"
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300)).save_pretrained(gpt2_dir)
    import shutil
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, gpt2_dir / name)

    cases = [
        (["ppl", tmp_path / "missing.txt", "--model", model_dir], "missing.txt"),
        (["ppl", empty, "--model", model_dir], "empty"),
        (["ppl", text_file, "--model", model_dir, "--n-local", 4096], "--n-local (4096)"),
        (["ppl", text_file, "--model", tmp_path / "no-model"], "does not exist"),
        (["ppl", text_file, "--model", not_a_model], "is not a GGUF file"),
        (["ppl", text_file, "--model", gpt2_dir], "llama, mistral, qwen2, qwen3, phi3"),
        (["generate", empty, "--model", model_dir], "empty"),
        (["passkey", "--model", model_dir, "--lengths", 20], "shorter than the prompt"),
    ]
    for argv, message in cases:
        _assert_fails(capsys, argv + ["--json", out, "--no-progress"] if argv[0] == "ppl" else argv,
                      message, outputs=[out])


@pytest.mark.parametrize("argv", [["ppl", "--n-local", "0"], ["ppl", "--methods", "stock,bogus"],
                                  ["passkey", "--depths", "1.5"], ["passkey", "--top-k-rows", "0"],
                                  ["frobnicate"]])
def test_malformed_options_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "error" in capsys.readouterr().err


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "lm_infinite.apps.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert all(command in done.stdout for command in ("ppl", "passkey", "generate", "demo"))


def test_the_old_module_paths_still_work_and_warn():
    """lm_infinite.cli, .server and .eval moved to lm_infinite.apps; the old paths are aliases
    that say so (DeprecationWarning) and give the very same objects."""
    done = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-m", "lm_infinite.cli", "--version"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("lminf "), done.stderr
    assert "lm_infinite.cli moved to lm_infinite.apps.cli" in done.stderr
    check = ("import warnings\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    warnings.simplefilter('always')\n"
             "    import lm_infinite.eval.corpus, lm_infinite.server.worker\n"
             "    from lm_infinite.cli import main\n"
             "import lm_infinite.apps.eval.corpus as new_corpus, lm_infinite.apps.server.worker as new_worker\n"
             "import lm_infinite.apps.cli as new_cli\n"
             "assert lm_infinite.eval.corpus is new_corpus and lm_infinite.server.worker is new_worker\n"
             "assert main is new_cli.main and lm_infinite.server.Engine is new_worker.Engine\n"
             "moved = sorted(str(w.message).split()[0] for w in caught if w.category is DeprecationWarning)\n"
             "assert moved == ['lm_infinite.cli', 'lm_infinite.eval', 'lm_infinite.server'], moved\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_version_is_the_package_version(capsys):
    import lm_infinite

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"lminf {lm_infinite.__version__}\n"


def _fails_cleanly(capsys, command, argv, message, status=1):
    """`lminf COMMAND` exits with `status` and one `lminf COMMAND: error: ...` line naming the
    problem; no traceback, and (for input checks) before the model is loaded."""
    if status == 2:
        with pytest.raises(SystemExit) as exit_info:
            _run(command, *argv)
        code = exit_info.value.code
    else:
        code = _run(command, *argv)
    err = capsys.readouterr().err
    assert code == status, err
    assert f"lminf {command}: error:" in err and message in err, err
    assert "Traceback" not in err
    return err


def test_each_command_reports_bad_input_as_one_error_line(model_dir, text_file, tmp_path, capsys):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    ok_json = tmp_path / "ok.json"
    cases = [
        ("ppl", [folder, "--model", model_dir], "is a directory, not a file"),
        ("ppl", [text_file, "--model", model_dir, "--json", ok_json, "--plot", "/proc/x.png"],
         "--plot /proc/x.png: cannot create a file in /proc"),
        ("ppl", [text_file, "--model", model_dir, "--json", folder], "--json"),
        ("passkey", ["--model", model_dir, "--lengths", 10**15], "--lengths: a 1000000000000000-token prompt"),
        ("generate", [folder, "--model", model_dir], "prompt file"),
        ("demo", ["--model", tmp_path / "missing-model"], "does not exist"),
    ]
    for command, argv, message in cases:
        err = _fails_cleanly(capsys, command, argv, message)
        if "missing-model" not in str(argv):  # found out by loading it
            assert "loading model" not in err  # refused before the 25 s load of a real model
    assert not ok_json.exists() and not list(tmp_path.glob(".ok.json*"))


def test_settings_the_kernels_refuse_are_errors_not_tracebacks(model_dir, text_file, capsys):
    _fails_cleanly(capsys, "generate", [text_file, "--model", model_dir, "--n-local", 10**15],
                   "out of memory: RingKVCache")
    _fails_cleanly(capsys, "ppl", [text_file, "--model", model_dir, "--methods", "lm-infinite+top-k",
                                   "--top-k-first-layer", 99, "--no-progress"],
                   "top_k.first_layer must be an int in [0, 1], got 99")


def test_a_huge_top_k_runs(model_dir, text_file, capsys):
    """--top-k 2^60 aborted the process; more than the candidates means all of them."""
    assert _run("ppl", text_file, "--model", model_dir, "--methods", "lm-infinite+top-k",
                "--top-k", 2**60, "--top-k-first-layer", 0, "--tokens", 60, "--no-progress") == 0
    assert "lm-infinite+top-k" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_a_device_this_machine_lacks_is_a_usage_error(model_dir, text_file, capsys):
    _fails_cleanly(capsys, "ppl", [text_file, "--model", model_dir, "--device", "cuda"],
                   "argument --device: 'cuda': CUDA is not available", status=2)
    _fails_cleanly(capsys, "generate", [text_file, "--device", "tpu"], "expected cpu, cuda or cuda:N",
                   status=2)


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "-1", "argument --temperature: expected a finite number >= 0, got '-1'"),
    ("--temperature", "inf", "argument --temperature: expected a finite number >= 0, got 'inf'"),
    ("--top-p", "0", "argument --top-p: expected a number in (0, 1], got '0'"),
    ("--top-p", "1.5", "argument --top-p: expected a number in (0, 1], got '1.5'"),
    ("--top-p", "half", "argument --top-p: expected a number in (0, 1], got 'half'"),
])
def test_sampling_options_out_of_range_are_usage_errors(text_file, capsys, option, value, message):
    _fails_cleanly(capsys, "generate", [text_file, option, value], message, status=2)


def test_sigint_during_a_run_exits_130_quietly(model_dir, tmp_path):
    # A run of many seconds (a long text, a small stride), so that the signal lands inside the
    # command: against a command that ends at once (bad arguments) it could land while the
    # interpreter shuts down, which no program can turn into a status of its own.
    text = tmp_path / "long.txt"
    text.write_text("The grass is green. def f(x):\n    return x + 1\n" * 4000)
    child = subprocess.Popen([sys.executable, "-m", "lm_infinite.apps.cli", "ppl", str(text), "--model",
                              str(model_dir), "--stride", "4", "--no-progress"], stderr=subprocess.PIPE, text=True)
    for line in child.stderr:
        if "model loaded" in line:
            break
    else:
        pytest.fail(f"the command ended before loading its model (status {child.wait()})")
    time.sleep(0.2)
    child.send_signal(signal.SIGINT)
    err = child.stderr.read()
    assert child.wait(timeout=60) == 130, err
    assert "Traceback" not in err, err


def test_outputs_are_written_only_as_regular_files(model_dir, text_file, tmp_path, capsys):
    """--json/--plot over a symbolic link or a device, pipe or socket is refused before the run
    (os.replace would put a file in place of the link, or of /dev/null when run as root)."""
    target = tmp_path / "target.json"
    target.write_text("kept")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    for path, kind in [(link, "a symbolic link"), (fifo, "a device, pipe or socket"),
                       ("/dev/null", "a device, pipe or socket")]:
        _fails_cleanly(capsys, "ppl", [text_file, "--model", model_dir, "--json", path], f"--json {path}: is {kind}")
        _fails_cleanly(capsys, "passkey", ["--model", model_dir, "--plot", path], f"--plot {path}: is {kind}")
    assert link.is_symlink() and target.read_text() == "kept"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_a_written_output_gets_the_usual_permissions(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    assert _run("ppl", text_file, "--model", model_dir, "--n-local", 16, "--tokens", 64, "--methods",
                "lm-infinite", "--json", out, "--no-progress") == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_unbounded_inputs_are_refused_before_memory_grows(model_dir, text_file, tmp_path, capsys):
    sparse = tmp_path / "sparse.txt"
    with open(sparse, "wb") as file:
        file.truncate(10 * 2**30)  # 10 GiB that take no disk: read whole, they took 4 GB of RSS
    _fails_cleanly(capsys, "ppl", [sparse, "--model", model_dir], "over the input limit of 64 MiB")
    _fails_cleanly(capsys, "generate", [sparse, "--model", model_dir], "over the input limit of 64 MiB")
    _fails_cleanly(capsys, "passkey", ["--model", model_dir, "--lengths", 150_000_000],
                   "--lengths: a 150000000-token prompt is over the input limit")
    _fails_cleanly(capsys, "ppl", [text_file, "--model", model_dir, "--max-input-mb", 0], "--max-input-mb",
                   status=2)


def test_generate_refuses_endless_stdin_in_bounded_memory(model_dir):
    """`lminf generate - < /dev/zero` grew to 3.1 GB in 9.5 s; now it reads at most the limit."""
    with open("/dev/zero", "rb") as zeros:
        done = subprocess.run([sys.executable, "-m", "lm_infinite.apps.cli", "generate", "-", "--model", str(model_dir),
                               "--max-input-mb", "2"], stdin=zeros, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "the prompt on stdin is larger than the input limit of 2 MiB" in done.stderr
    assert "Traceback" not in done.stderr
