"""Every file a user hands the command line, damaged or wrong (issue 21): each case must end with
exit code 2 and exactly one line on stderr naming the problem, write nothing into an existing
run and leave no output that looks complete. The count of cases is quoted in the README's
reliability section (`len(CASES)`)."""

import pathlib
import pickle
import re
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.run_fixtures import make_random_runs
from unclip_jax import cli

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CLIP_HF = FIXTURES / "karlo_tiny" / "text_encoder"
KARLO = FIXTURES / "karlo_tiny"
GLIDE_PT = FIXTURES / "glide_tiny" / "base.pt"
GLIDE_BPE = FIXTURES / "glide_bpe"


def _png_header_only(path: pathlib.Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 16)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _edit_safetensors(path: pathlib.Path, edit) -> None:
    """Rewrite a safetensors file with edit(dict of arrays) applied (numpy, no torch)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


class _RunsCode:
    """Unpickles into a call of os.system: what a hostile .pt file holds."""

    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    runs = make_random_runs(root / "runs", names=("clip", "decoder", "glide_base"))
    f = root / "files"
    f.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(f / "good.png")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(f / "mask.png")
    (f / "text.png").write_text("this is not an image\n")
    (f / "empty.png").write_bytes(b"")
    good = (f / "good.png").read_bytes()
    (f / "cut.png").write_bytes(good[: len(good) // 2])
    _png_header_only(f / "bomb.png", 40_000, 40_000)
    (f / "folder.png").mkdir()
    # Prompt files.
    (f / "empty.txt").write_text("\n\n")
    (f / "binary.txt").write_bytes(bytes(range(256)) * 4)

    # Weights: a transformers CLIP folder with its tokenizer beside it, then damaged copies.
    def clip_copy(name):
        folder = _copy(CLIP_HF, f / name)
        for item in (KARLO / "tokenizer").iterdir():
            shutil.copy(item, folder / item.name)
        return folder

    cut = clip_copy("clip_cut") / "model.safetensors"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (clip_copy("clip_garbage") / "model.safetensors").write_bytes(b"\xff" * 64)
    (clip_copy("clip_bad_config") / "config.json").write_text("{ not json")
    (clip_copy("clip_no_weights") / "model.safetensors").unlink()

    def rename_key(name, new):  # the first key ending in `name`, renamed
        def edit(t):
            key = next(k for k in sorted(t) if k.endswith(name))
            t[key.replace(name, new)] = t.pop(key)

        return edit

    def reshape_key(name):  # the first key ending in `name`, one row longer
        def edit(t):
            key = next(k for k in sorted(t) if k.endswith(name))
            t[key] = np.zeros((t[key].shape[0] + 1,) + t[key].shape[1:], t[key].dtype)

        return edit

    _edit_safetensors(clip_copy("clip_renamed") / "model.safetensors",
                      rename_key("q_proj.weight", "query_proj.weight"))  # fmt: skip
    _edit_safetensors(clip_copy("clip_misshaped") / "model.safetensors",
                      reshape_key("q_proj.weight"))  # fmt: skip
    tok = clip_copy("clip_bad_tokenizer")
    (tok / "tokenizer.json").write_text("[1, 2")
    # Karlo folders: a missing component, a renamed key, a mis-shaped tensor, a scheduler that
    # samples otherwise than the config.
    karlo = _copy(KARLO, f / "karlo_no_text_proj")
    shutil.rmtree(karlo / "text_proj")
    weights = "diffusion_pytorch_model.safetensors"
    _edit_safetensors(_copy(KARLO, f / "karlo_renamed") / "decoder" / weights,
                      rename_key("to_q.weight", "to_query.weight"))  # fmt: skip
    _edit_safetensors(_copy(KARLO, f / "karlo_misshaped") / "prior" / weights,
                      reshape_key("to_q.weight"))  # fmt: skip
    scheduler = _copy(KARLO, f / "karlo_bad_scheduler") / "decoder_scheduler"
    config = scheduler / "scheduler_config.json"
    config.write_text(config.read_text().replace('"learned_range"', '"fixed_small_log"'))
    # GLIDE torch pickles.
    pt = GLIDE_PT.read_bytes()
    (f / "glide_cut.pt").write_bytes(pt[: len(pt) // 2])
    (f / "glide_text.pt").write_text("not a checkpoint")
    with zipfile.ZipFile(f / "glide_code.pt", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps(_RunsCode(), protocol=2))
        z.writestr("archive/version", "3\n")
    (f / "empty_tokenizer").mkdir()
    # Configs.
    (f / "broken_config.py").write_text("def get_config(arg=None):\n    return {{{\n")
    # Image-text dataset folders.
    (f / "data_empty").mkdir()
    bad = f / "data_corrupt"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.png").write_bytes(b"garbage" * 10)
        (bad / f"{i}.txt").write_text("a red square")
    # A samples folder for eval with a broken record.
    samples = f / "samples_bad_record"
    (samples / "images").mkdir(parents=True)
    (samples / "record.json").write_text('{"prompts": [')
    return {"runs": runs, "files": f, "root": root}


# fmt: off
# (id, argv with {run:NAME}, {file:NAME} and {out} placeholders, words the line must contain)
CASES = [
    # prompt files
    ("prompts-missing", "sample --base {run:glide_base} --prompts {file:nope.txt}", "not found"),
    ("prompts-empty", "sample --base {run:glide_base} --prompts {file:empty.txt}", "no prompts"),
    ("prompts-binary", "sample --base {run:glide_base} --prompts {file:binary.txt}", "binary.txt"),
    ("prompts-folder", "sample --base {run:glide_base} --prompts {file:folder.png}", "folder.png"),
    # run folders
    ("run-missing", "sample --base {file:no_run} x", "no run at"),
    ("run-is-a-file", "sample --base {file:good.png} x", "good.png"),
    ("run-wrong-kind", "sample --base {run:clip} x", "not a GLIDE one"),
    ("run-no-checkpoint", "sample --base {file:data_empty} x", "no checkpoint"),
    ("step-not-a-number", "sample --base {run:glide_base} --step latest x", "must be a number"),
    # images
    ("image-missing", "vary {file:nope.png} --clip {run:clip} --decoder {run:decoder}",
     "not found"),
    ("image-text", "vary {file:text.png} --clip {run:clip} --decoder {run:decoder}", "text.png"),
    ("image-empty", "vary {file:empty.png} --clip {run:clip} --decoder {run:decoder}", "empty.png"),
    ("image-cut", "vary {file:cut.png} --clip {run:clip} --decoder {run:decoder}", "cut.png"),
    ("image-bomb", "vary {file:bomb.png} --clip {run:clip} --decoder {run:decoder}", "bomb.png"),
    ("image-folder", "interpolate {file:good.png} {file:folder.png} --clip {run:clip} "
     "--decoder {run:decoder}", "folder.png"),
    ("mask-text", "inpaint {file:good.png} {file:text.png} x --base {run:glide_base}", "text.png"),
    ("mask-cut", "inpaint {file:good.png} {file:cut.png} x --base {run:glide_base}", "cut.png"),
    ("mask-bomb", "inpaint {file:good.png} {file:bomb.png} x --base {run:glide_base}", "bomb.png"),
    ("inpaint-image-bomb", "inpaint {file:bomb.png} {file:mask.png} x --base {run:glide_base}",
     "bomb.png"),
    # weight files
    ("safetensors-cut", "convert clip {file:clip_cut} --out {out}", "model.safetensors"),
    ("safetensors-garbage", "convert clip {file:clip_garbage} --out {out}", "model.safetensors"),
    ("weights-config-json", "convert clip {file:clip_bad_config} --out {out}", "config.json"),
    ("weights-missing", "convert clip {file:clip_no_weights} --out {out}", "model.safetensors"),
    ("weights-renamed-key", "convert clip {file:clip_renamed} --out {out}", "q_proj"),
    ("weights-misshaped", "convert clip {file:clip_misshaped} --out {out}", "q_proj"),
    ("karlo-missing-part", "convert karlo {file:karlo_no_text_proj} --out {out}", "text_proj"),
    ("karlo-renamed-key", "convert karlo {file:karlo_renamed} --out {out}", "to_q"),
    ("karlo-misshaped", "convert karlo {file:karlo_misshaped} --out {out}", "to_q"),
    ("karlo-scheduler", "convert karlo {file:karlo_bad_scheduler} --out {out}", "variance_type"),
    ("pt-cut", f"convert glide {{file:glide_cut.pt}} --tokenizer {GLIDE_BPE} --out {{out}}",
     "glide_cut.pt"),
    ("pt-not-a-zip", f"convert glide {{file:glide_text.pt}} --tokenizer {GLIDE_BPE} --out {{out}}",
     "glide_text.pt"),
    ("pt-runs-code", f"convert glide {{file:glide_code.pt}} --tokenizer {GLIDE_BPE} --out {{out}}",
     "glide_code.pt"),
    # tokenizer folders
    ("tokenizer-corrupt", "convert clip {file:clip_bad_tokenizer} --out {out}", "tokenizer"),
    ("tokenizer-empty", f"convert clip {CLIP_HF} --tokenizer {{file:empty_tokenizer}} "
     "--out {out}", "empty_tokenizer"),
    ("glide-tokenizer-empty", "convert glide {file:glide_cut.pt} --tokenizer "
     "{file:empty_tokenizer} --out {out}", "empty_tokenizer"),
    # config overrides and config files
    ("override-no-value", "train --config toy2d:tiny --set optim.steps --workdir {run:decoder}",
     "key=value"),
    ("override-unknown", "train --config toy2d:tiny --set optim.stepz=3 --workdir {run:decoder}",
     "optim.stepz"),
    ("override-type", "train --config toy2d:tiny --set optim.steps=many --workdir {run:decoder}",
     "optim.steps"),
    ("config-missing", "train --config {file:nope.py} --workdir {out}", "nope.py"),
    ("config-syntax", "train --config {file:broken_config.py} --workdir {out}", "broken_config.py"),
    ("train-other-kind", "train --config toy2d:tiny --workdir {run:decoder}", "decoder"),
    # dataset folders
    ("data-missing", "data prepare --dataset image_text:{file:nope} --data_dir {out}", "nope"),
    ("data-empty", "data prepare --dataset image_text:{file:data_empty} --data_dir {out}",
     "data_empty"),
    ("data-corrupt", "data prepare --dataset image_text:{file:data_corrupt} --data_dir {out}",
     "data_corrupt"),
    # samples folders
    ("eval-no-record", "eval {file:data_empty}", "record.json"),
    ("eval-bad-record", "eval {file:samples_bad_record}", "record.json"),
]
# fmt: on


def _argv(template: str, world, out: pathlib.Path) -> list[str]:
    def fill(match) -> str:
        kind, _, name = match.group(1).partition(":")
        if kind == "run":
            return world["runs"][name]
        if kind == "file":
            return str(world["files"] / name)
        return str(out)

    return [re.sub(r"\{(run:[^}]+|file:[^}]+|out)\}", fill, w) for w in template.split()]


def _snapshot(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_one_line_and_exit_2(case, world, capfd, tmp_path):
    _, template, words = case
    out = tmp_path / "out"
    before = _snapshot(world["root"])
    argv = _argv(template, world, out)
    code = cli.main(argv)
    captured = capfd.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err[-3000:]
    assert len(lines) == 1, captured.err[-3000:]
    assert lines[0].startswith(f"unclip-jax {argv[0]}: error: "), lines[0]
    assert words in lines[0], lines[0]
    assert _snapshot(world["root"]) == before, "an input or an existing run was written to"
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_the_library_prints_nothing_when_imported_without_torch():
    # transformers logs "PyTorch was not found" on import; CI has no torch. Hide it here too.
    code = ("import sys; sys.modules['torch'] = None; import unclip_jax.tokenizers, "
            "unclip_jax.cli; import transformers; print('ok')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok" and out.stderr == "", out.stderr


def test_the_case_count_is_the_readme_s():
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    assert f"{len(CASES)} hostile inputs" in readme, len(CASES)
