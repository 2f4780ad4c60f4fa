"""Adapter folder reads, and writes that a kill at any moment cannot leave half done.

    atomic_write(T)       write .T.<pid>-<tok>.tmp  --os.replace-->  T
    atomic_writes(T, U)   write both temps, then the two renames back to back
    replace_folder(N, T)  N (a whole new folder)  --exchange (Linux) or aside+rename-->  T
    clean_stale(T)        remove our temp files/folders for T whose writer is gone

Rules:
1. One file is replaced with `os.replace` (atomic on POSIX and Windows): a reader sees the whole
   old or the whole new file. Temp files are created here with mode 0o666 and folders with 0o777,
   so the umask applies as for any other file (mkstemp/mkdtemp would give 0600/0700).
2. A PEFT adapter folder is two files, and no rename replaces two files at once. So the weights
   record which config they were saved with: the safetensors header metadata holds
   `CONFIG_DIGEST_KEY`, the sha256 of the config (canonical JSON). `save_adapter` writes both
   temp files, then renames the weights and the config back to back (`atomic_writes`); a folder
   killed between the two renames (new weights, old config) or mixed by any other means fails the
   check and is refused with `AdapterError`. Files without the key (PEFT's, older lora_fx) load
   unchecked. Why the header and not `adapter_config.json`: PEFT 0.21 warns ("Unexpected keyword
   arguments ... upgrade PEFT") about every config key it does not know and drops it, while it
   ignores safetensors metadata, so PEFT reads lora_fx folders exactly as before. A config edited
   by hand (values, not formatting) is refused too; the message says how to accept it. Why not a
   folder swap: `save_adapter` writes into folders that hold other files (README.md, checkpoints),
   and readers (PEFT) open the two files by path, so a swap between their opens mixes anyway.
   Both files are fsynced before the renames (durable, and the renames are then quick).
3. A whole folder (a merged model) is replaced by exchanging it with the new one in one
   `renameat2(RENAME_EXCHANGE)` (Linux 3.15+, most local file systems): the path is the whole old
   or the whole new folder at every instant. Where that is unavailable the old folder is renamed
   aside and the new one renamed in: for that instant the path is absent (never mixed), and a
   kill there leaves both whole folders under temp names. The old one is deleted last.
4. Temp names are `.<name>.<pid>-<8 hex>.tmp`. `clean_stale` removes only those whose pid is not a
   running process, and the names older lora_fx versions used (`.<name>.<8 chars>[.tmp]`, from
   mkstemp/mkdtemp) once older than an hour; never anything else.
5. diffusers' LoRA layout is one file, `pytorch_lora_weights.safetensors` (`save_lora_adapter`):
   keys without `base_model.model.`, the LoRA config as JSON in the safetensors header under
   `lora_adapter_metadata`. One file needs no pairing record: an `atomic_write` is enough.
   `read_adapter` takes a PEFT folder, a diffusers folder or a diffusers file and returns tensors
   under PEFT keys either way, so loading has one path.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import safetensors
import torch

from lora_fx.config import LoraConfig, read_config_file
from lora_fx.core.keys import from_diffusers_key
from lora_fx.errors import AdapterError, ConfigError, LoraFxError

__all__ = [
    "BIN_NAME",
    "CONFIG_DIGEST_KEY",
    "CONFIG_NAME",
    "DIFFUSERS_METADATA_KEY",
    "DIFFUSERS_NAME",
    "SAFETENSORS_NAME",
    "atomic_write",
    "atomic_writes",
    "clean_stale",
    "config_digest",
    "make_temp_folder",
    "read_adapter",
    "read_adapter_folder",
    "replace_folder",
    "temp_path",
]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONFIG_DIGEST_KEY = "lora_fx.config_sha256"  # safetensors metadata: the paired config (rule 2)
DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE (rule 5)
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

_LEGACY_AGE_S = 3600.0  # older versions' temp names carry no pid: removed once this old
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def config_digest(config: dict) -> str:
    """sha256 of a config dict as canonical JSON: key order and whitespace do not matter."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_adapter_folder(folder: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of a PEFT adapter folder (safetensors, or .bin with weights_only).

    Raises:
        AdapterError: A file is missing, a tensor file cannot be read, or the weights were
            saved with another config (rule 2); the message names the file.
        ConfigError: `adapter_config.json` is not JSON or not a valid LoRA config (named).
    """
    if not (folder / CONFIG_NAME).is_file():
        raise AdapterError(
            f"no {CONFIG_NAME} in {str(folder)!r}; expected a PEFT adapter folder, or a diffusers "
            f"LoRA folder or file ({DIFFUSERS_NAME})"
        )
    cfg, data = read_config_file(folder / CONFIG_NAME)
    for name in (SAFETENSORS_NAME, BIN_NAME):
        path = folder / name
        if not path.is_file():
            continue
        try:
            if name == BIN_NAME:
                return cfg, torch.load(path, map_location="cpu", weights_only=True)
            # One open file for metadata and tensors: a concurrent replace cannot split them.
            with safetensors.safe_open(str(path), framework="pt") as st:
                _check_pair(folder, (st.metadata() or {}).get(CONFIG_DIGEST_KEY), data)
                return cfg, {key: st.get_tensor(key) for key in st.keys()}  # noqa: SIM118
        except LoraFxError:
            raise
        except Exception as e:  # safetensors' SafetensorError, pickle's errors: name the file
            raise AdapterError(
                f"cannot read {str(path)!r} ({type(e).__name__}: {' '.join(str(e).split())}); "
                "the file is truncated or not a tensor file"
            ) from e
    raise AdapterError(f"no {SAFETENSORS_NAME} or {BIN_NAME} in {str(folder)!r}")


def read_adapter(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor], str]:
    """Config, tensors (under PEFT file keys) and layout of a PEFT folder or diffusers file/folder.

    The layout is `"peft"` or `"diffusers"`, for messages that quote keys as the file has them.

    Raises:
        AdapterError: Neither layout is there, or a file cannot be read (see the readers).
        ConfigError: The config is not a valid LoRA config (the file is named).
    """
    if path.is_file():
        return (*read_diffusers_file(path), "diffusers")
    if (path / CONFIG_NAME).is_file() or not (path / DIFFUSERS_NAME).is_file():
        return (*read_adapter_folder(path), "peft")
    return (*read_diffusers_file(path / DIFFUSERS_NAME), "diffusers")


def read_diffusers_file(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config (from the header) and tensors, under PEFT file keys, of a diffusers LoRA file.

    Raises:
        AdapterError: Not a safetensors file, or its header has no LoRA config (rule 5).
        ConfigError: The header's config is not JSON or not a valid LoRA config.
    """
    expected = (
        f"expected a diffusers LoRA file ({DIFFUSERS_NAME} from save_lora_adapter or "
        f"lora_fx.save_adapter(..., format='diffusers')) with the LoRA config as JSON under "
        f"{DIFFUSERS_METADATA_KEY!r} in its safetensors header, or a PEFT folder with {CONFIG_NAME}"
    )
    try:
        with safetensors.safe_open(str(path), framework="pt") as st:
            text = (st.metadata() or {}).get(DIFFUSERS_METADATA_KEY)
            if text is None:
                raise AdapterError(
                    f"{str(path)!r} has no {DIFFUSERS_METADATA_KEY!r} header; {expected}"
                )
            tensors = {from_diffusers_key(key): st.get_tensor(key) for key in st.keys()}  # noqa: SIM118
    except LoraFxError:
        raise
    except Exception as e:  # safetensors' SafetensorError and OSError: name the file
        reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
        raise AdapterError(f"cannot read {str(path)!r} ({reason}); {expected}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{DIFFUSERS_METADATA_KEY!r} in {str(path)!r} is not JSON ({e}): {text[:80]!r}; "
            + expected
        ) from e
    try:
        return LoraConfig.from_dict(data), tensors
    except ConfigError as e:
        raise type(e)(f"{e} (in the {DIFFUSERS_METADATA_KEY!r} header of {str(path)!r})") from e


def _check_pair(folder: Path, recorded: str | None, config: dict) -> None:
    """Refuse weights whose header names another config than the folder's (rule 2)."""
    if recorded is None or recorded == config_digest(config):
        return
    raise AdapterError(
        f"{str(folder)!r} mixes two saves: {SAFETENSORS_NAME} was saved with another "
        f"{CONFIG_NAME} (sha256 {recorded[:12]}..., the file's is "
        f"{config_digest(config)[:12]}...), e.g. a save_adapter killed between its two files. "
        "Save the adapter again. If you edited the config on purpose, rewrite the weights "
        "without the check: save_file(load_file(p), p, metadata={'format': 'pt'})"
    )


def temp_path(target: Path, suffix: str = ".tmp") -> Path:
    """A fresh temp name beside `target` that `clean_stale` recognises (rule 4)."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


def make_temp_folder(target: Path) -> Path:
    """Create an empty temp folder beside `target` (mode 0o777 less the umask)."""
    while True:
        path = temp_path(target)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o777)
            return path


def atomic_write(target: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp_path)` then rename into place; the temp file is removed on failure."""
    atomic_writes({target: write})


def atomic_writes(writes: dict[Path, Callable[[str], object]]) -> None:
    """Write every file to a temp name, then rename them into place in order, back to back.

    Each file is replaced atomically; the renames run with nothing between them, so a kill
    leaves a mix of old and new files only within that instant (rule 2 makes it detectable).
    Temp files are removed on failure.
    """
    temps: dict[Path, Path] = {}
    try:
        for target, write in writes.items():
            temps[target] = _new_temp_file(target)
            mode = os.stat(temps[target]).st_mode & 0o777  # 0o666 less the umask
            write(str(temps[target]))
            if os.stat(temps[target]).st_mode & 0o777 != mode:  # a writer made its own (0600)
                os.chmod(temps[target], mode)
            _fsync(temps[target])  # on disk before the renames, which are then quick
        for target, tmp in temps.items():
            os.replace(tmp, target)
    except BaseException:
        for tmp in temps.values():
            if os.path.lexists(tmp):
                os.unlink(tmp)
        raise
    for target in writes:
        clean_stale(target)


def _fsync(path: Path) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp_file(target: Path) -> Path:
    """Create an empty temp file beside `target` (mode 0o666 less the umask)."""
    while True:
        tmp = temp_path(target)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def replace_folder(new: Path, target: Path) -> None:
    """Put the whole folder `new` at `target`, replacing a folder there (rule 3)."""
    if not target.exists():
        os.rename(new, target)  # onto nothing (or an empty folder): one atomic step
    elif _exchange(new, target):
        shutil.rmtree(new)  # `new` now holds the old folder
    else:
        aside = make_temp_folder(target)
        os.rename(target, aside)  # onto the empty temp folder
        os.rename(new, target)
        shutil.rmtree(aside)
    clean_stale(target)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    renameat2.argtypes += [ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the kernel or file system cannot exchange
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def clean_stale(target: Path) -> int:
    """Remove temp files and folders of earlier, dead writers to `target` (rule 4); how many."""
    ours = re.compile(rf"\.{re.escape(target.name)}\.(\d+)-[0-9a-f]{{8}}\.tmp")
    legacy = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}(\.tmp)?")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:  # cleaning up never fails the write that asked for it
        return 0
    removed = 0
    for entry in entries:
        match = ours.fullmatch(entry.name)
        with contextlib.suppress(OSError):
            if match:
                stale = not _pid_alive(int(match.group(1)))
            elif legacy.fullmatch(entry.name):
                stale = time.time() - entry.stat(follow_symlinks=False).st_mtime > _LEGACY_AGE_S
            else:
                continue
            if stale:
                _remove(Path(entry.path))
                removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id runs (this host's pids; another user's count as alive)."""
    if pid == os.getpid() or os.name != "posix":
        return True  # our own names are in use; elsewhere signal 0 is no probe: keep them
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, ignoring one that is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
