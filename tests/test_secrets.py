"""Secrets and trust: no remote code unless asked, HF_TOKEN written nowhere, no web dashboard,
safe loaders for YAML and checkpoints."""

from __future__ import annotations

import base64
import glob
import os
import re
import secrets
import shutil
import tempfile

import pytest
import yaml

from lora_rank_search.search.cli import main
from lora_rank_search.search.config import parse_config
from lora_rank_search.search.runner import prepare
from lora_rank_search.search.space import trial_settings
from lora_rank_search.trainables.trial import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = [os.path.join(ROOT, p) for p in ("search", "trainables", "analysis")]


def _recording(monkeypatch, owner, name: str, calls: list) -> None:
    original = getattr(owner, name)

    def record(*args, **kwargs):
        calls.append((f"{owner.__name__}.{name}", kwargs.get("trust_remote_code", "missing")))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, record)


@pytest.mark.parametrize("trust", [None, True])
def test_trust_remote_code_reaches_every_loader_and_is_false_unless_the_config_says_so(trust, raw_config, monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    calls: list = []
    for owner, name in ((AutoConfig, "from_pretrained"), (AutoTokenizer, "from_pretrained"),
                        (AutoModelForCausalLM, "from_pretrained"), (AutoModelForCausalLM, "from_config")):
        _recording(monkeypatch, owner, name, calls)
    cfg = parse_config(raw_config(model={} if trust is None else {"trust_remote_code": trust}))
    prepared = prepare(cfg, log=lambda _: None)
    build_model(trial_settings(cfg, prepared.model_path, prepared.targets), 2, "cpu")
    loaders = {name for name, _ in calls}
    assert loaders == {"AutoConfig.from_pretrained", "AutoTokenizer.from_pretrained",
                       "AutoModelForCausalLM.from_pretrained", "AutoModelForCausalLM.from_config"}
    assert {value for _, value in calls} == {bool(trust)}, calls


def _leaks(data: bytes, token: str) -> bool:
    """The token as text, hex (cloudpickle blobs in Tune's state) or base64."""
    forms = [token.encode(), token.encode().hex().encode(), base64.b64encode(token.encode())[:20]]
    return any(form in data for form in forms)


@pytest.mark.slow
def test_hf_token_appears_in_no_file_log_or_output_of_a_real_search(raw_config, tmp_path, monkeypatch, capfd):
    import ray

    token = "hf_" + secrets.token_hex(16)
    ray_temp = tempfile.mkdtemp(prefix="lrs-", dir="/tmp")  # Ray's session logs of this run only
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    monkeypatch.setenv("RAY_TMPDIR", ray_temp)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inits: list = []
    original_init = ray.init

    def recording_init(*args, **kwargs):
        context = original_init(*args, **kwargs)
        inits.append((kwargs, context.dashboard_url))
        return context

    monkeypatch.setattr(ray, "init", recording_init)
    raw = raw_config(name="secret", lora={"ranks": [8]}, train={"max_steps": 20, "eval_every": 10})
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(raw))
    try:
        assert main(["search", str(config)]) == 0
        out, err = capfd.readouterr()
        # The only dashboard-like server Ray could start is off; nothing web-facing was started.
        assert len(inits) == 1 and inits[0][0]["include_dashboard"] is False and not inits[0][1]
        experiment = tmp_path / "runs" / "secret"
        files = [p for p in glob.glob(str(experiment / "**"), recursive=True) if os.path.isfile(p)]
        ray_logs = [p for p in glob.glob(os.path.join(ray_temp, "**"), recursive=True) if os.path.isfile(p)]
        assert any("events.out.tfevents" in f for f in files) and any(f.endswith("tuner.pkl") for f in files)
        assert any(f.endswith(".log") or f.endswith(".out") or f.endswith(".err") for f in ray_logs)
        for path in files + ray_logs:
            with open(path, "rb") as handle:
                assert not _leaks(handle.read(), token), f"HF_TOKEN found in {path}"
        assert not _leaks((out + err).encode(), token)
        assert "best eval loss" in out, "the search really ran"
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)


def test_configs_and_checkpoints_are_read_with_safe_loaders():
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load)\(|Loader\s*=|weights_only\s*=\s*False|pickle\.loads?\(")
    # The one exception: --resume's repair of Tune's experiment state (search/storage.py) reads the
    # file Tune's own Tuner.restore unpickles right after it; it trusts nothing Tune does not.
    allowed = re.compile(r"search/storage\.py:\d+: manager = cloudpickle\.loads\(")
    found = []
    for package in PACKAGES:
        for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True):
            with open(path) as handle:
                found += [f"{path}:{n}: {line.strip()}" for n, line in enumerate(handle, 1) if unsafe.search(line)]
    assert [f for f in found if not allowed.search(f)] == []


def test_a_yaml_object_tag_is_refused_and_never_executed(tmp_path, capsys):
    target = tmp_path / "pwned"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: !!python/object/apply:os.system ['touch {target}']\n")
    assert main(["search", str(config)]) == 2
    assert "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'" in capsys.readouterr().err
    # ... and through --set, where values are parsed as YAML too: the text stays a plain string.
    config.write_text("lora: {ranks: [0]}\n")
    assert main(["search", str(config), "--set", f"name=!!python/object/apply:os.system ['touch {target}']"]) == 2
    assert not target.exists()
