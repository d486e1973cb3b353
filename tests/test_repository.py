"""The repository stands alone: nothing shipped reaches outside it, and the data it ships under
data/traces is what data/traces/README.md says (sha256, rows), loadable by the tools by short name."""

import hashlib
import os
import re

import pytest

from tools import load_gen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRACES = os.path.join(ROOT, "data", "traces")

SCANNED_DIRS = ("kunjax", "serving", "sharding", "tools", "tests", ".ci")
SCANNED_FILES = ("README.md", "WORKSPACE.md", "Makefile", "pyproject.toml")
TEXT_SUFFIXES = (".py", ".md", ".proto", ".toml", ".cfg", ".ini", ".txt", ".sh", ".yaml", ".yml", ".json")

# Ways a path escapes the checkout. This file, which has to spell them out, is the one file not scanned.
DOT2 = ".."
OUTSIDE = [
    (r"\.\.[/\\]", "a relative path into the parent directory"),
    (r"[\"']\.\.[\"']", "the parent directory as a path component"),
    (r"os\.pardir", "os.pardir"),
    (r"dirname\(\s*(REPO_)?ROOT\s*\)", "the directory above the repository root"),
    (r"shared[/\\]traces|[\"']shared[\"']\s*,\s*[\"']traces", "the old shared/traces folder beside the repository"),
    (r"(?<![\w.])/(work|home|Users|mnt|data)/", "an absolute path on a developer's machine"),
]


def scanned_files():
    out = [os.path.join(ROOT, f) for f in SCANNED_FILES]
    for d in SCANNED_DIRS:
        for base, dirs, files in os.walk(os.path.join(ROOT, d)):
            dirs[:] = [x for x in dirs if x not in ("__pycache__", ".pytest_cache")]
            for f in files:
                if f.endswith(TEXT_SUFFIXES) or "." not in f:  # extensionless: scripts like .ci/run
                    out.append(os.path.join(base, f))
    return [f for f in out if f != os.path.abspath(__file__)]


def test_nothing_reaches_outside_the_repository():
    files = scanned_files()
    assert len(files) > 40 and os.path.join(ROOT, ".ci", "run") in files
    bad = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                for pattern, what in OUTSIDE:
                    if re.search(pattern, line):
                        bad.append(f"{os.path.relpath(path, ROOT)}:{n}: {what}: {line.strip()[:120]}")
    assert not bad, "references outside the repository:\n" + "\n".join(bad)


def test_the_scan_catches_the_old_references():
    """The patterns above flag the paths the tests and README used before the data moved in."""
    # Assembled from pieces so that this sample text is not itself a path outside the repository.
    folder = "sh" + "ared"
    old = ['TRACES = os.path.join(os.path.dirname(REPO_ROOT), "' + folder + '", "traces")',
           "--trace=" + DOT2 + "/" + folder + "/traces/AzureLLMInferenceTrace_conv.csv",
           "open('/" + "work/" + folder + "/traces/x.csv')", "os.path.join(ROOT, " + repr(DOT2) + ", 'x')"]
    for line in old:
        assert any(re.search(p, line) for p, _ in OUTSIDE), line
    for fine in ["os.path.join(ROOT, 'data', 'traces')", "data/traces/README.md", "http://example.com/x"]:
        assert not any(re.search(p, fine) for p, _ in OUTSIDE), fine


# file -> (sha256, rows): rows are data rows (CSV without the header, JSONL lines, JSON list items).
SHIPPED = {
    "AzureLLMInferenceTrace_code.csv": ("54e9a6d2a4bd06ba1e060304b900abbc74cbea53de96506e60fe5bb4f2277fb6", 8819),
    "AzureLLMInferenceTrace_conv.csv": ("2f1e5b666d4e3055fdbba98598ce2ec307767b9064e03e2fa46676dbcc7d0bf8", 19366),
    "burstgpt1_head400.csv": ("7865fda5dac50938a84dfccb06c405e2f5202969ecfbd671c8399de00f4335f0", 400),
    "mooncake_conversation_trace_head1000.jsonl": (
        "d289afab1294d376c92b3496d96c27f8f0e36893398fbda7957f3a40e37b70ba", 1000),
    "mooncake_synthetic_trace_head1000.jsonl": (
        "ec82421ca1eb9cbacd757868b5fb28405a7b5c0af6172bcb69e1317acd67dcb9", 1000),
    "sharegpt_sg90k_first_turn_sampled_2978.json": (
        "e95458dfb016a21e5ced20ced9b1694e8d8eeb7c9442005f588563fdd53318c9", 2978),
    "sharegpt_v3_filtered_500.json": ("1dfcb9e6a6b794145128a3d2dd2f3c83aff8f11c806654e77aede2b0cda30e0e", 500),
}


def test_shipped_data_matches_its_readme():
    with open(os.path.join(TRACES, "README.md")) as f:
        readme = f.read()
    data_files = sorted(f for f in os.listdir(TRACES) if os.path.isfile(os.path.join(TRACES, f)) and f != "README.md")
    assert data_files == sorted(SHIPPED)
    total = 0
    for name, (sha, _) in SHIPPED.items():
        with open(os.path.join(TRACES, name), "rb") as f:
            blob = f.read()
        total += len(blob)
        assert hashlib.sha256(blob).hexdigest() == sha, name
        assert f"`{name}`" in readme and sha in readme, f"data/traces/README.md does not describe {name} ({sha})"
    assert total < 5 << 20
    for lic in ("CC-BY-4.0.txt", "Apache-2.0.txt"):
        assert os.path.getsize(os.path.join(TRACES, "LICENSES", lic)) > 10_000 and f"LICENSES/{lic}" in readme


@pytest.mark.parametrize("name", sorted(load_gen.TRACES))
def test_every_shipped_trace_loads_by_short_name(name):
    arrivals = load_gen.load_trace(name)
    assert len(arrivals) == SHIPPED[load_gen.TRACES[name]][1]
    assert arrivals[0].t == 0.0 and all(b.t >= a.t for a, b in zip(arrivals, arrivals[1:]))
    assert all(a.input_len >= 0 and a.output_len >= 0 for a in arrivals)  # BurstGPT logs failures as 0


def test_benchmark_windows_are_in_the_azure_traces():
    """The windows a later benchmark replays (KunServe's: code from row 5100, 927 rows; conversation
    from row 9342, 759 rows) are whole in the shipped files."""
    code = load_gen.load_trace("azure_code", 5100, 927)
    conv = load_gen.load_trace("azure_conv", 9342, 759)
    assert len(code) == 927 and len(conv) == 759
    assert 200 < code[-1].t < 240 and 90 < conv[-1].t < 110  # ~220 s and ~100 s of real time


def test_unknown_trace_name_is_one_clear_error(capsys):
    with pytest.raises(SystemExit) as e:
        load_gen.main(["--trace", "azure_nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "azure_nope" in err and "azure_conv" in err


def test_readme_data_paths_exist():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    paths = set(re.findall(r"\bdata/[\w./-]+[\w]", readme))
    assert paths, "the README shows no in-repository trace"
    for p in paths:
        assert os.path.exists(os.path.join(ROOT, p)), p
