"""Writing files safely: atomic writes (`atomic_output`, `write_text_atomic`, `save_image_atomic`) put a file next
to its final name under a hidden temporary name and rename it into place only when complete, so a reader (or a
second process writing the same path) never sees a half-written or mixed file; a failed write leaves nothing
behind and says how much space was needed. `check_image_path` / `check_folder_path` refuse an output path before
any work is done."""

import contextlib
import errno
import os
import shutil
import tempfile

NO_SPACE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _write_errors() -> tuple:
    """What a failed write raises: OSError (Python, PIL), RuntimeError (torch.save: "basic_ios::clear: iostream
    error", "unexpected pos"), SafetensorError (safetensors: "I/O error")."""
    try:
        from safetensors import SafetensorError
    except ImportError:
        return (OSError, RuntimeError)
    return (OSError, RuntimeError, SafetensorError)


WRITE_ERRORS = _write_errors()


def format_megabytes(num_bytes: float) -> str:
    return f"{max(num_bytes, 0) / 2**20:,.0f} MB" if num_bytes >= 2**20 else f"{max(num_bytes, 0) / 2**20:.2f} MB"


def free_bytes(folder: str) -> int:
    """Free space of the file system holding `folder` (or its nearest existing parent)."""
    folder = os.path.abspath(folder)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return shutil.disk_usage(folder).free


def _os_error(code: int, message: str) -> OSError:
    """An OSError with an errno whose text is just `message` (no "[Errno 28]" in front)."""
    error = OSError(message)
    error.errno = code
    return error


def write_error(folder: str, needed_bytes, error: BaseException, what: str = "the file") -> OSError:
    """The OSError to raise when writing `what` into `folder` failed: "no space left" when it is that (an ENOSPC
    errno, or less free space than needed; call it before removing the partial files, which a full disk leaves)."""
    needed = f"needed ~{format_megabytes(needed_bytes)}, " if needed_bytes else ""
    free = free_bytes(folder)
    full = getattr(error, "errno", None) in NO_SPACE_ERRNOS or (needed_bytes and free < needed_bytes)
    if full:
        return _os_error(
            errno.ENOSPC,
            f"No space left in {folder} ({needed}{format_megabytes(free)} free) while writing {what}; nothing "
            "was left half-written. Free some space (e.g. delete old checkpoint-* folders or lower "
            "--checkpoints_total_limit) or write elsewhere, then run again.",
        )
    return _os_error(
        getattr(error, "errno", None) or errno.EIO,
        f"Could not write {what} into {folder} ({needed}{format_megabytes(free)} free): {error}. Nothing was left "
        "half-written.",
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str, needed_bytes: int = 0):
    """Yields a temporary path next to `path`; renames it onto `path` when the block completes, removes it when the
    block fails. Write errors become an OSError that names the folder and the space needed."""
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    name, suffix = os.path.splitext(os.path.basename(path))
    handle, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(handle)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; the result gets the mode a plain open() gives
    try:
        yield tmp
        os.replace(tmp, path)  # atomic on one file system: readers see the old file or the new one, never a mix
    except WRITE_ERRORS as error:
        failure = write_error(folder, needed_bytes or os.path.getsize(tmp), error, os.path.basename(path))
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise failure from error
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str):
    """Writes `text` (UTF-8) to `path` atomically."""
    data = text.encode("utf-8")
    with atomic_output(path, len(data)) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# Image outputs


def image_format(path: str, flag: str = "the output path") -> str:
    """The PIL format for an image path (from its extension); a ValueError naming `flag` when PIL cannot write it."""
    from PIL import Image

    extension = os.path.splitext(str(path))[1].lower()
    formats = Image.registered_extensions()
    writable = sorted(ext for ext, fmt in formats.items() if fmt in Image.SAVE)
    if extension not in formats or formats[extension] not in Image.SAVE:
        shown = ", ".join(ext for ext in (".png", ".jpg", ".webp", ".bmp", ".tif") if ext in writable)
        raise ValueError(
            f"{flag} {path!r} must end in an image extension PIL can write ({shown}, ...), got "
            f"{extension or 'no extension'!r}."
        )
    return formats[extension]


def check_image_path(path: str, flag: str = "--output") -> str:
    """Checks before any work that an image can be written at `path`: a writable format, not a folder, a parent that
    is (or can be) a folder. Returns the PIL format."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a folder; pass a file name such as {os.path.join(path, 'samples.png')}.")
    fmt = image_format(path, flag)
    check_folder_path(os.path.dirname(os.path.abspath(path)), flag)
    return fmt


def check_folder_path(folder: str, flag: str):
    """Checks that `folder` is a writable folder or can be created: no part of it is an existing file."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{flag} {folder!r} cannot be a folder: {probe} is a file.")
    if not os.access(probe, os.W_OK):
        raise ValueError(f"{flag} {folder!r}: {probe} is not writable.")


def save_image_atomic(image, path: str):
    """Saves a PIL image to `path` atomically, in the format its extension names."""
    fmt = image_format(path)
    with atomic_output(path) as tmp:
        image.save(tmp, format=fmt)
