"""Secrets and local paths kept out of saved text: `redact_command(argv)` gives a command line fit for a model card
or a log, with the values of secret flags (`--*token*`, `--*key*`, `--*password*`, `--*secret*`, `--*credential*`)
and anything shaped like a Hugging Face token replaced by `REDACTED`, and local paths cut to their last component."""

import os
import re

REDACTED = "REDACTED"
SECRET_FLAG = re.compile(r"^--?[\w-]*(token|key|password|passwd|secret|credential)[\w-]*$", re.IGNORECASE)
HF_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{16,}\b")


def _looks_like_local_path(value: str) -> bool:
    """Absolute, home-relative or parent-relative paths: they tell about the machine, not about the run."""
    return value.startswith(("/", "~", "../")) or bool(re.match(r"^[A-Za-z]:[\\/]", value))


def redact_command(argv, keep_paths: bool = False) -> list:
    """`argv` with secret flag values replaced by `REDACTED`, token-shaped strings removed, and (unless `keep_paths`)
    local paths cut to their last component, so a command can go into a model card or a log that is shared."""
    redacted, hide_next = [], False
    for arg in (str(a) for a in argv):
        if hide_next:
            redacted.append(REDACTED)
            hide_next = False
            continue
        flag, eq, value = arg.partition("=")
        if SECRET_FLAG.match(flag):
            if eq:
                redacted.append(f"{flag}={REDACTED}")
            else:
                redacted.append(arg)
                hide_next = True
            continue
        if not keep_paths:
            if eq and flag.startswith("-") and _looks_like_local_path(value):
                arg = f"{flag}={os.path.basename(os.path.normpath(value))}"
            elif not eq and not arg.startswith("-") and _looks_like_local_path(arg):
                arg = os.path.basename(os.path.normpath(os.path.expanduser(arg))) or arg
        redacted.append(HF_TOKEN_PATTERN.sub(REDACTED, arg))
    return redacted


def redact_text(text: str, secrets=()) -> str:
    """`text` with every given secret and every Hugging Face token-shaped string replaced by `REDACTED`."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return HF_TOKEN_PATTERN.sub(REDACTED, text)


def is_secret_name(name: str) -> bool:
    """True for option or config names that hold secrets (hub_token, api_key, password, ...)."""
    return bool(SECRET_FLAG.match("--" + name.lstrip("-")))
