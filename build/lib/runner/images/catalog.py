"""The images beyond `base`: one per agent that needs more than python3 and the shim.

Versions are pinned here, so an image's tag (a digest of its inputs) changes exactly
when what it installs changes.
"""

from __future__ import annotations

from runner.images.build import SPECS, ImageSpec, images_dir, register, sandbox_files

CODEX_VERSION = "0.163.0"
CLAUDE_CODE_VERSION = "2.1.330"
# Exact versions: an image's tag is a digest of its inputs, so the same tag must always
# mean the same packages.
BUILTIN_PACKAGES = ("anthropic==2.12.0", "openai==3.54.0", "mcp==2.3.0", "httpx==0.28.1")

# A C toolchain and Node.js: too big for `base` (docs/performance.md), here for the runs
# that build code.
DEV_PACKAGES = ("gcc", "g++", "libc6-dev", "nodejs")

_CANDIDATES = [
    ImageSpec("dev", "base", apt=DEV_PACKAGES,
              description="base plus gcc, g++, libc6-dev and Node.js"),
    ImageSpec("builtin", "base", files=sandbox_files("agent_loop.py"),
              pip=BUILTIN_PACKAGES,
              description="Airlock's own agent loop with the anthropic, openai and mcp SDKs"),
    ImageSpec("codex", "base", pip=(f"openai-codex-cli-bin=={CODEX_VERSION}",),
              description=f"the Codex CLI {CODEX_VERSION}"),
    # The npm package is a wrapper; the CLI itself is the native binary of the platform
    # package it pins (linux-x64, glibc). Both are packed; images/claude-code checks them.
    ImageSpec("claude-code", "base",
              npm=(f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}",
                   f"@anthropic-ai/claude-code-linux-x64@{CLAUDE_CODE_VERSION}"),
              description=f"Claude Code {CLAUDE_CODE_VERSION} (native linux-x64 binary)"),
]


def load_catalog() -> None:
    for spec in _CANDIDATES:
        if spec.name not in SPECS and (images_dir() / spec.name / "Dockerfile").is_file():
            register(spec)
