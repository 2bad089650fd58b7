"""The README's first screen: the two one-liners a newcomer copies, and CI running the second as written."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def requirement_names(text):
    return {re.split(r"[<>=\[ ]", line.strip())[0].lower() for line in text.splitlines()
            if line.strip() and not line.startswith(("#", "-r"))}


def test_the_one_liners_install_a_cpu_torch_then_only_what_each_needs():
    block = re.search(r"```bash\n(.*?)```", read("README.md"), re.S).group(1).strip().splitlines()
    run, test = block[:2]
    torch_line = "pip install torch==2.13.0 --extra-index-url https://download.pytorch.org/whl/cpu"
    assert run == f"{torch_line} && pip install -r requirements.txt && python app.py"
    assert test == f"{torch_line} && pip install -r requirements-dev.txt && pytest"
    ci = read(".ci/run")
    assert f"pip install -q {torch_line.split('pip install ')[1]}" in ci and "pip install -q -r requirements-dev.txt" in ci
    app_needs = requirement_names(read("requirements.txt"))
    # the dev install is the package itself (whose requirements are requirements.txt) with its test and train extras
    assert read("requirements-dev.txt").splitlines()[-1] == "-e .[test,train]"
    pyproject = read("pyproject.toml")
    assert 'dependencies = { file = ["requirements.txt"] }' in pyproject
    extras = re.search(r"\[project.optional-dependencies\](.*?)\n\[", pyproject, re.S).group(1)
    assert not app_needs & {"pytest", "playwright", "tensorboard"}  # the app (and a Space) installs no test tools
    assert {"pytest", "playwright", "tensorboard"} <= {re.split(r"[<>=\[ ]", name)[0] for name in re.findall(r'"([^"]+)"', extras)}
