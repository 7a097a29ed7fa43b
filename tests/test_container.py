"""The container recipe, checked without a Docker engine.

* hadolint on the Dockerfile, the CircleCI schema, and the wiring of the CircleCI workflows;
* the TemplateFlow pre-fetch step of the image, run offline against a seeded cache;
* a slow replay of the Dockerfile in a fresh virtual environment: the build context is staged
  through ``.dockerignore``, every COPY and RUN step runs in order (RUN with ``/bin/sh -c``, as
  Docker does), and the entrypoint then runs the demo as an unprivileged user with the image's
  ENV, so a missing dependency, COPY or file permission breaks here rather than in CI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
CIRCLECI = REPO / ".circleci" / "config.yml"
FETCH_TEMPLATES = REPO / "docker" / "fetch_templates.py"
VERSION = (REPO / "version").read_text().strip()

# Prepended to a child Python: any attempt to open a network connection fails at once.
NO_NETWORK = (
    "import socket\n"
    "def _refuse(*a, **k):\n"
    "    raise OSError('network disabled by the test')\n"
    "socket.socket.connect = _refuse\n"
    "socket.getaddrinfo = _refuse\n"
)


def _tool(name: str) -> str:
    """Path of a console script of the test environment (``.venv/bin`` first)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]'")
    return found


# -- a minimal Dockerfile reader ---------------------------------------------------------


@dataclass
class Step:
    """One Dockerfile instruction: keyword (upper case) and its argument text."""

    keyword: str
    text: str


def read_dockerfile(path: Path = DOCKERFILE) -> list[Step]:
    """Instructions of a Dockerfile, continuation lines joined and comments dropped."""
    steps: list[Step] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker also drops comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, text = line.partition(" ")
        steps.append(Step(keyword.upper(), text.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return steps


def _substitute(text: str, values: dict[str, str]) -> str:
    """Docker's ``$NAME`` / ``${NAME}`` substitution in ENV, ARG, COPY and WORKDIR."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), ""), text)


def _pairs(text: str, values: dict[str, str]) -> list[tuple[str, str]]:
    """``KEY=VALUE ...`` of an ENV or ARG instruction (``ARG NAME`` gives an empty value)."""
    out = []
    for token in shlex.split(text):
        key, _, value = token.partition("=")
        out.append((key, _substitute(value, values)))
    return out


def dockerignore_excludes(relpath: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` drops ``relpath`` from the build context.

    Docker's rules, as far as this repository uses them: the last matching pattern wins,
    ``!`` re-includes, a pattern matching a parent folder matches everything below it,
    ``*`` and ``?`` stay within one path component and ``**`` spans any number of them.
    """
    parts = relpath.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        regex = regex.replace(r"\[", "[").replace(r"\]", "]")  # character classes: [cod]
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def stage_context(dest: Path) -> None:
    """Copy the repository's build context (``.dockerignore`` applied) to ``dest``."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    reincluded = [p.lstrip("!").strip("/") for p in patterns if p.startswith("!")]
    for folder, dirs, files in os.walk(REPO):
        base = Path(folder).relative_to(REPO).as_posix().removeprefix(".")
        # Skip folders that are excluded with nothing re-included below them (.venv, .git...).
        dirs[:] = [
            d
            for d in dirs
            if not dockerignore_excludes(f"{base}/{d}".lstrip("/"), patterns)
            or any(r.startswith(f"{base}/{d}".lstrip("/") + "/") for r in reincluded)
        ]
        for name in files:
            rel = f"{base}/{name}".lstrip("/")
            if not dockerignore_excludes(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest / rel)


@dataclass
class Replay:
    """State of a Dockerfile replayed under ``root`` (the emulated image's ``/``)."""

    root: Path
    workdir: str = "/"
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    entrypoint: list[str] = field(default_factory=list)

    def host(self, path: str) -> Path:
        """The host path of an image path (absolute, or relative to WORKDIR)."""
        if not path.startswith("/"):
            path = f"{self.workdir.rstrip('/')}/{path}"
        return self.root / path.lstrip("/")

    def host_env(self) -> dict[str, str]:
        """The image's ENV with absolute paths moved under ``root``."""
        return {k: str(self.host(v)) if v.startswith("/") else v for k, v in self.env.items()}


def replay_dockerfile(
    context: Path,
    root: Path,
    build_args: dict[str, str],
    run_env: dict[str, str],
    before_run: Callable[[Replay], None] = lambda state: None,
) -> Replay:
    """Apply the Dockerfile's ARG, ENV, WORKDIR, COPY and RUN steps to ``root``.

    ``run_env`` is the environment of the RUN steps before the image's ARG and ENV values are
    added (it puts the fresh venv first on PATH); ``before_run`` sees the state before each RUN
    step. pip's cache stays on (the image's ``PIP_NO_CACHE_DIR`` is not applied): the only
    shortcut the replay takes. Raises with the step and its output when a RUN step fails.
    """
    state = Replay(root)
    for step in read_dockerfile():
        values = {**state.args, **state.env}
        if step.keyword == "ARG":
            for key, default in _pairs(step.text, values):
                state.args[key] = build_args.get(key, default)
        elif step.keyword == "ENV":
            state.env.update(_pairs(step.text, values))
        elif step.keyword == "WORKDIR":
            state.workdir = _substitute(step.text, values)
            state.host(".").mkdir(parents=True, exist_ok=True)
        elif step.keyword == "COPY":
            *sources, target = [t for t in shlex.split(step.text) if not t.startswith("--")]
            for source in sources:
                src = context / _substitute(source, values)
                assert src.exists(), f"COPY {source}: not in the build context (.dockerignore?)"
                dest = state.host(_substitute(target, values))
                if src.is_dir():
                    shutil.copytree(src, dest, dirs_exist_ok=True)
                else:
                    if target.endswith("/") or dest.is_dir():
                        dest = dest / src.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)
        elif step.keyword == "RUN":
            before_run(state)
            env = {**run_env, **state.args, **state.host_env()}
            env.pop("PIP_NO_CACHE_DIR", None)
            env["PIP_NO_COMPILE"] = "1"
            done = subprocess.run(
                ["/bin/sh", "-c", step.text],
                cwd=state.host("."),
                env=env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, f"RUN {step.text}\n{done.stdout}\n{done.stderr}"
        elif step.keyword == "ENTRYPOINT":
            state.entrypoint = json.loads(step.text)
    return state


# -- fast checks ---------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    done = subprocess.run(
        [_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_flags_an_unpinned_pip_install(tmp_path):
    # The check above is only worth something if hadolint reads the file and applies its pip
    # rules: an unpinned install added to our Dockerfile must fail with DL3013.
    broken = tmp_path / "Dockerfile"
    broken.write_text(DOCKERFILE.read_text() + "RUN python -m pip install requests\n")
    done = subprocess.run(
        [_tool("hadolint"), str(broken)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "DL3013" in done.stdout


def test_dockerfile_essentials():
    steps = read_dockerfile()
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", steps[0].text), steps[0]
    runs = " ".join(s.text for s in steps if s.keyword == "RUN")
    makefile = (REPO / "Makefile").read_text()
    pin = re.search(r"torch==[\w.+]+", makefile).group(0)
    assert pin in runs, f"Makefile pins {pin}; the Dockerfile must install the same torch"
    assert "pip install --no-deps ." in runs  # the package itself, not an editable install
    env = dict(kv for s in steps if s.keyword == "ENV" for kv in _pairs(s.text, {"IMAGE": "x"}))
    for key in ("HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR"):
        assert env[key].startswith("/tmp"), f"{key} must be under /tmp (read-only root)"
    assert env["MCSR_CONTAINER"].startswith("docker://")
    assert env["TEMPLATEFLOW_AUTOUPDATE"] == "0"
    assert json.loads(next(s.text for s in steps if s.keyword == "ENTRYPOINT")) == ["mcsr"]
    labels = " ".join(s.text for s in steps if s.keyword == "LABEL")
    for key in ("title", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_dockerignore_keeps_what_the_dockerfile_copies(tmp_path):
    stage_context(tmp_path)
    copied = [
        t
        for s in read_dockerfile()
        if s.keyword == "COPY"
        for t in shlex.split(s.text)[:-1]
        if not t.startswith("--")
    ]
    assert copied, "the Dockerfile copies nothing"
    for source in copied:
        assert (tmp_path / source).exists(), f"COPY {source}: dropped by .dockerignore"
    assert (tmp_path / "bids_mcsr" / "__init__.py").is_file()
    # ...and the context stays small: no venv, git history, tests or caches.
    assert not any(p.name == "__pycache__" for p in tmp_path.rglob("*"))
    for absent in (".git", ".venv", "tests", "Dockerfile"):
        assert not (tmp_path / absent).exists(), absent


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("bids_mcsr/cli.py", False),
        ("bids_mcsr/__pycache__/cli.cpython-311.pyc", True),
        ("bids_mcsr/inr/fit.pyc", True),
        ("docker/fetch_templates.py", False),
        ("tests/test_container.py", True),
        (".git/HEAD", True),
        ("version", False),
    ],
)
def test_dockerignore_rules(path, excluded):
    patterns = ["*", "!bids_mcsr", "!docker", "!version", "**/__pycache__", "**/*.py[cod]"]
    assert dockerignore_excludes(path, patterns) is excluded


def test_circleci_config_matches_schema(tmp_path):
    cmd = [_tool("check-jsonschema"), "--builtin-schema", "vendor.circle-ci"]
    done = subprocess.run([*cmd, str(CIRCLECI)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # The schema is lenient about unknown keys, but it does check types and values.
    broken = tmp_path / "config.yml"
    text = CIRCLECI.read_text()
    assert "docker_layer_caching: true" in text
    broken.write_text(text.replace("docker_layer_caching: true", "docker_layer_caching: often"))
    done = subprocess.run([*cmd, str(broken)], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0


# Steps CircleCI provides; anything else used as a step must be a command of the config.
CIRCLECI_BUILTIN_STEPS = {
    "run", "checkout", "setup_remote_docker", "save_cache", "restore_cache", "deploy",
    "store_artifacts", "store_test_results", "persist_to_workspace", "attach_workspace",
    "add_ssh_keys", "when", "unless",
}  # fmt: skip


def test_circleci_workflows_reference_existing_jobs():
    import yaml

    config = yaml.safe_load(CIRCLECI.read_text())
    jobs, commands = config["jobs"], config.get("commands", {})
    executors = config.get("executors", {})
    workflows = {k: v for k, v in config["workflows"].items() if k != "version"}
    assert workflows, "no workflow"
    for wf_name, workflow in workflows.items():
        names = []
        for entry in workflow["jobs"]:
            name, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            assert name in jobs, f"workflow {wf_name} runs undefined job {name}"
            names.append(name)
            for needed in (opts or {}).get("requires", []):
                assert needed in names, f"{name} requires {needed}, not run before it"
    for job_name, job in jobs.items():
        if "executor" in job:
            assert job["executor"] in executors, f"job {job_name}: unknown executor"
        for step in job["steps"]:
            key = step if isinstance(step, str) else next(iter(step))
            assert key in CIRCLECI_BUILTIN_STEPS or key in commands, (
                f"job {job_name} uses undefined step/command {key}"
            )
    # Every job runs somewhere: a job no workflow mentions is dead configuration.
    used = {
        e if isinstance(e, str) else next(iter(e)) for w in workflows.values() for e in w["jobs"]
    }
    assert used == set(jobs)


def test_circleci_run_steps_are_valid_bash():
    import yaml

    config = yaml.safe_load(CIRCLECI.read_text())
    steps = [
        step["run"]
        for block in (*config["jobs"].values(), *config.get("commands", {}).values())
        for step in block["steps"]
        if isinstance(step, dict) and "run" in step
    ]
    assert steps
    for run in steps:
        command = run if isinstance(run, str) else run["command"]
        done = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stderr}"


# -- the cluster recipe (docs/hpc.md) and the README's commands -----------------------

HPC = REPO / "docs" / "hpc.md"


def bash_blocks(markdown: str) -> list[str]:
    """The bodies of the ```bash blocks of a Markdown text."""
    return re.findall(r"^```bash\n(.*?)^```", markdown, flags=re.S | re.M)


def test_documented_shell_commands_are_valid_bash():
    readme = (REPO / "README.md").read_text()
    docker = readme[
        readme.index("<!-- section:docker -->") : readme.index("<!-- /section:docker -->")
    ]
    blocks = bash_blocks(docker) + bash_blocks(HPC.read_text())
    assert len(blocks) >= 8
    for block in blocks:
        done = subprocess.run(["bash", "-n", "-c", block], capture_output=True, text=True)
        assert done.returncode == 0, f"{block}\n{done.stderr}"


def _fake(bin_dir: Path, name: str, stdout: str = "") -> Path:
    """A stand-in command that appends its arguments, one per line, to ``<name>.log``."""
    log = bin_dir / f"{name}.log"
    script = bin_dir / name
    script.write_text(
        f'#!/bin/bash\nprintf "%s\\n" "$@" >> {shlex.quote(str(log))}\necho "---" >> '
        f"{shlex.quote(str(log))}\necho {shlex.quote(stdout)}\n"
    )
    script.chmod(0o755)
    return log


def test_slurm_recipe_submits_one_task_per_subject_then_the_group_job(tmp_path):
    # The submit script and the participant job, run with sbatch and apptainer faked: the
    # array has one task per subject, and task N hands subject N to the container.
    blocks = bash_blocks(HPC.read_text())
    submit = next(b for b in blocks if "sbatch --parsable" in b)
    participant = next(b for b in blocks if "--job-name=mcsr\n" in b)
    bids = tmp_path / "bids"
    for label in ("02", "01", "10"):
        (bids / f"sub-{label}" / "anat").mkdir(parents=True)
    (bids / "dataset_description.json").write_text("{}")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch_log = _fake(bin_dir, "sbatch", stdout="4242")
    apptainer_log = _fake(bin_dir, "apptainer")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def run(script: str, **extra: str) -> None:
        text = script.replace("/project/bids", str(bids))
        done = subprocess.run(
            ["bash", "-c", text],
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

    run(submit)
    assert (tmp_path / "subjects.txt").read_text().split() == ["01", "02", "10"]
    calls = sbatch_log.read_text().split("---\n")[:-1]
    assert calls[0].split() == ["--parsable", "--array=1-3%20", "mcsr_participant.sbatch"]
    assert calls[1].split() == ["--dependency=afterany:4242", "mcsr_group.sbatch"]

    task = {"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "4"}
    run(participant, **task, CUDA_VISIBLE_DEVICES="3", TMPDIR=str(tmp_path))
    args = apptainer_log.read_text().split("\n")
    assert args[args.index("--participant_label") + 1] == "02"
    assert args[args.index("--nthreads") + 1] == "4"
    assert "--nv" in args and "CUDA_VISIBLE_DEVICES=3" in args
    assert f"{bids}:/bids:ro" in args
    assert not list(tmp_path.glob("mcsr_7_2")), "the task's scratch folder is left behind"


# -- TemplateFlow pre-fetch ----------------------------------------------------------


def _template_paths(tf_home: Path) -> list[Path]:
    """Where TemplateFlow keeps each file fetch_templates.py asks for (creates the skeleton)."""
    code = (
        NO_NETWORK + "import json, runpy\n"
        f"m = runpy.run_path({str(FETCH_TEMPLATES)!r})\n"
        "from templateflow import api\n"
        "print(json.dumps([str(p) for q in m['QUERIES'] for p in api.ls(m['TEMPLATE'], **q)]))\n"
    )
    env = {**os.environ, "TEMPLATEFLOW_HOME": str(tf_home), "TEMPLATEFLOW_AUTOUPDATE": "0"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return [Path(p) for p in json.loads(done.stdout.splitlines()[-1])]


def seed_templates(tf_home: Path) -> list[Path]:
    """Put small valid stand-ins where the pre-fetched templates go (no network here)."""
    import nibabel as nib
    import numpy as np

    paths = _template_paths(tf_home)
    rng = np.random.default_rng(0)
    for path in paths:
        data = (rng.random((8, 9, 10)) > 0.3).astype(np.uint8)
        nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    return paths


def _run_fetch(tf_home: Path) -> subprocess.CompletedProcess:
    code = (
        NO_NETWORK + f"import runpy; runpy.run_path({str(FETCH_TEMPLATES)!r}, run_name='__main__')"
    )
    env = {**os.environ, "TEMPLATEFLOW_HOME": str(tf_home), "TEMPLATEFLOW_AUTOUPDATE": "0"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def seeded_home(tmp_path_factory) -> Path:
    """A TemplateFlow home with stand-ins for every pre-fetched file (do not modify)."""
    home = tmp_path_factory.mktemp("templateflow")
    paths = seed_templates(home)
    assert len(paths) == 3
    return home


@pytest.mark.slow  # seeded_home: TemplateFlow indexes its whole skeleton, 5-20 s
def test_prefetched_templates_are_the_ones_the_app_reads(seeded_home, monkeypatch):
    # templates.py must find a real TemplateFlow file for both variants (head and brain) in
    # what the image pre-fetches, or the container silently falls back to nilearn's MNI152.
    from bids_mcsr import templates

    monkeypatch.setenv("TEMPLATEFLOW_HOME", str(seeded_home))
    for skull_stripped in (False, True):
        found = templates.local_templateflow_file("MNI152NLin2009cAsym", skull_stripped)
        assert found is not None, f"skull_stripped={skull_stripped}: not pre-fetched"
        loaded = templates.load_template("MNI152NLin2009cAsym", skull_stripped=skull_stripped)
        assert loaded.source == str(found)


@pytest.mark.slow  # as above
def test_fetch_templates_verifies_a_seeded_cache_offline(seeded_home):
    done = _run_fetch(seeded_home)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(" ok (") == 3
    assert "tpl-MNI152NLin2009cAsym_res-01_desc-brain_mask.nii.gz ok" in done.stdout


@pytest.mark.slow  # as above
def test_fetch_templates_rejects_a_truncated_file(seeded_home, tmp_path):
    tf_home = tmp_path / "templateflow"
    shutil.copytree(seeded_home, tf_home)
    broken = tf_home / "tpl-MNI152NLin2009cAsym" / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
    broken.write_bytes(broken.read_bytes()[:40])  # a download cut short
    done = _run_fetch(tf_home)
    assert done.returncode == 1
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("fetch_templates:")]
    assert len(lines) == 1, done.stderr
    assert "'desc': None, 'suffix': 'T1w'" in lines[0] and "network" in lines[0]
    # Emptied, so that the next build downloads it again instead of trusting it.
    assert broken.stat().st_size == 0


def test_fetch_templates_needs_templateflow_home():
    env = {k: v for k, v in os.environ.items() if k != "TEMPLATEFLOW_HOME"}
    done = subprocess.run(
        [sys.executable, str(FETCH_TEMPLATES)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "TEMPLATEFLOW_HOME" in done.stderr


# -- the recipe, replayed ------------------------------------------------------------


def _world_runnable(path: Path) -> bool:
    """Whether any user can run ``path`` (every folder above it searchable by others)."""
    path = path.resolve()
    return all(p.stat().st_mode & 0o001 for p in (path, *path.parents))


def fresh_python(version: tuple[int, int]) -> tuple[str, list[str]]:
    """An interpreter of ``version`` for the fresh venv and the prefix to run it as nobody.

    Running the entrypoint as uid 65534 (like ``docker run -u``) needs root here (setpriv)
    and an interpreter others can reach: a pyenv Python under a private /root is not, so a
    system one is preferred. Without both, the venv is run as the current user.
    """
    name = f"python{version[0]}.{version[1]}"
    candidates = [shutil.which(name), f"/usr/bin/{name}", f"/usr/local/bin/{name}"]
    if sys.version_info[:2] == version:
        candidates.append(getattr(sys, "_base_executable", sys.executable))
    usable = [Path(c) for c in candidates if c and Path(c).is_file()]
    if not usable:
        pytest.skip(f"no {name} here (the image's Python)")
    if os.geteuid() == 0 and shutil.which("setpriv"):
        for python in usable:
            if _world_runnable(python):
                drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
                return str(python), drop
    return str(usable[0]), []


@pytest.mark.slow
def test_dockerfile_recipe_in_a_fresh_venv():
    if os.environ.get("MCSR_CONTAINER"):
        pytest.skip("inside the image: its build already ran this recipe")
    base = re.search(r"python:(\d+)\.(\d+)", read_dockerfile()[0].text)
    python, as_nobody = fresh_python((int(base[1]), int(base[2])))

    # The venv holds about 2 GB in ~20k files: on a disk shared with other jobs, writing and
    # deleting them takes minutes, in RAM seconds. The data stays on disk: Deno (the BIDS
    # validator) refuses to read under /dev. Open permissions: nobody must read both.
    shm = Path("/dev/shm")
    in_ram = shm.is_dir() and shutil.disk_usage(shm).free > 6e9
    tops = [
        Path(tempfile.mkdtemp(prefix="mcsr-recipe-", dir=shm if in_ram else None)),
        Path(tempfile.mkdtemp(prefix="mcsr-recipe-")),
    ]
    try:
        for top in tops:
            top.chmod(0o755)
        venv, context, root = tops[0] / "venv", tops[1] / "context", tops[1] / "root"
        stage_context(context)
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
        # The image's /tmp: world-writable and sticky, like the tmpfs of --read-only runs.
        (root / "tmp").mkdir(parents=True)
        (root / "tmp").chmod(0o1777)
        run_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))
        }
        run_env["PATH"] = f"{venv / 'bin'}:{run_env['PATH']}"

        def seed_once(state: Replay) -> None:
            # No network to TemplateFlow's S3 here: stand-ins let fetch_templates.py run.
            home = state.host_env().get("TEMPLATEFLOW_HOME")
            if home and not Path(home).exists():
                seed_templates(Path(home))

        image = replay_dockerfile(context, root, {"VERSION": VERSION}, run_env, seed_once)
        entry = [str(venv / "bin" / image.entrypoint[0]), *image.entrypoint[1:]]
        # The image's /tmp is the tmpfs of `docker run --read-only --tmpfs /tmp`.
        env = {**run_env, **image.host_env(), "TMPDIR": str(root / "tmp")}
        cwd = image.host(".")

        def run(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
            return subprocess.run(
                [*as_nobody, *args],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )

        done = run(*entry, "--version")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"mcsr {VERSION}"
        assert not list(venv.rglob("*.egg-link")), "the package must not be an editable install"

        # The demo's dataset, shrunk to 6 mm voxels, then both levels with a 1-epoch fit.
        demo, out = cwd / "demo", cwd / "out"
        build = f"from bids_mcsr.demo import build_dataset; build_dataset({str(demo)!r}, 6.0)"
        done = run(str(venv / "bin" / "python"), "-c", build)
        assert done.returncode == 0, done.stderr
        tiny = ["--epochs", "1", "--device", "cpu", "--nthreads", "1", "--quiet"]
        done = run(*entry, str(demo / "bids"), str(out), "participant", *tiny, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        done = run(*entry, str(demo / "bids"), str(out), "group", "--quiet")
        assert done.returncode == 0, done.stdout + done.stderr
        outputs = sorted(p.name for p in out.rglob("*_desc-superres_*.nii.gz"))
        assert outputs == ["sub-01_desc-superres_T1w.nii.gz", "sub-01_desc-superres_T2w.nii.gz"]
        assert (out / "group_qc.tsv").stat().st_size > 0
        generated = json.loads((out / "dataset_description.json").read_text())["GeneratedBy"]
        assert generated[0]["Container"]["Tag"] == image.env["MCSR_CONTAINER"]
        assert image.env["MCSR_CONTAINER"] == f"docker://bids/mcsr:{VERSION}"
    finally:
        for top in tops:
            shutil.rmtree(top, ignore_errors=True)
