"""starflow2-jax: STARFlow2 (a frozen VLM + a TARFlow stream) in JAX/Flax."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="starflow2-jax",
    version="0.1.0",
    description="STARFlow2 in JAX/Flax: unified text and image generation with normalizing flows.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(
        include=["starflow2_jax*", "data_pipelines*", "experiments*", "demos*"]),
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
    entry_points={
        "console_scripts": ["starflow2=starflow2_jax.cli:main"],
        # The demos plug into the library's extension points; the library never imports them.
        "starflow2.commands": ["demo=demos.staged_demo:COMMAND",
                               "caption-demo=demos.caption_demo:COMMAND",
                               "fae-demo=demos.fae_demo:COMMAND"],
        "starflow2.record_sources": [
            "fashion_mnist=demos.fashion_mnist:record_source",
            "fashion_mnist_stages=demos.fashion_mnist_stages:record_source"],
        "starflow2.evaluators": [
            "fashion_mnist_generation=demos.fashion_mnist_judges:generation",
            "fashion_mnist_understanding=demos.fashion_mnist_judges:understanding"],
    },
)
