"""A batch job's output file: durable appends and resume after a crash.

Beside OUTPUT lives OUTPUT.batchllm-state, written (atomically) before the first record: the input
file's size and SHA-256, and the options that decide a line's answer (the model, the sampling
defaults, the limits a line is checked against: `results_options` in the CLI). Running the same
command again finds the output, checks that it belongs to the same input and options (so that one
output never mixes answers of two settings, nor keeps a line refused under a limit since raised),
cuts a torn last line (a write interrupted by SIGKILL or power loss), and
collects what is already finished: the ids of answered lines and the line numbers of error
records. Those lines are neither recomputed nor rewritten. A damaged output or state file (a line
that is not a record, a state file that is not this format) is named with its line and refused:
resuming from it could answer a line twice or never. Records are appended as requests complete and
made durable (flush + fsync) every `sync_every` records, and within `sync_seconds` of being written
by a background thread, so a long request still running never holds finished results back.

OpenAI Batch error records go to a separate errors file, as OpenAI's Batch API returns them
(`errors_path_for`: out.jsonl -> out.errors.jsonl, results -> results.errors, or `--errors-file`; an output an
earlier version began keeps the one its state file records: `default_errors_path`), so the output holds one
record per custom_id; resume reads both files, and both are tied to the input by the one state file.
A write that fails (a full disk, an I/O error) raises `OutputWriteError` naming the file and the
cause; what was made durable before stays, and the next run resumes from it.

Writer of OUTPUT, its errors file and its state file only.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import threading
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchllm.config import DTYPE_ALIASES, FP8_KV_CACHE_DTYPES

STATE_SUFFIX = ".batchllm-state"
STATE_TMP_SUFFIX = ".tmp"
"""Appended to a state file's name while it is rewritten (`_write_state`)."""
DIRECTORY_LOCK = ".batchllm-lock"
"""The file inside a `run --ray` output directory that `OutputLock.for_directory` locks while a job runs (removed when
it ends; one a killed job left is locked again): no result of the job (`job_entries` leaves it out)."""
_LINE_IN_MESSAGE = re.compile(r"^line (\d+):")


class JobError(RuntimeError):
    """The job cannot start (the message says why); nothing was written."""


class InputChanged(JobError):
    """The job's input was not the file it was tied to when its lines were read (it changed as the job started).
    Made by `input_changed`; its one argument is its message, so that it crosses a pickle (a Ray task's error)."""


def input_changed(path: Path, expected: tuple[int, str], size_now: int) -> InputChanged:
    """The InputChanged of `path`, tied to `expected` (its size and SHA-256), now `size_now` bytes long."""
    change = (f"{expected[0]} bytes when the job began, {size_now} now" if size_now != expected[0] else
              "the same size, other bytes")
    return InputChanged(f"the input {str(path)!r} changed while the job read it ({change}); run the same command "
                        "again once the file is final (with --overwrite where it says so)")


class OutputWriteError(JobError):
    """Writing results failed (disk full, I/O error); the message names the file and the cause.
    Records made durable before the failure are kept."""

    def __init__(self, path: Path, error: OSError, what: str = "results to") -> None:
        super().__init__(f"cannot write {what} {str(path)}: {error.strerror or error}")
        self.path, self.error = path, error

    @classmethod
    def of_state_file(cls, state_path: Path, error: OSError) -> OutputWriteError:
        """The failure to write the output's state file (`_write_state`), in one wording wherever it happens."""
        return cls(state_path, error, "the output's state file")


def errors_path_for(output: Path) -> Path:
    """Where OpenAI Batch error records go by default: out.jsonl -> out.errors.jsonl (the output's name with .errors
    before its .jsonl suffix); another name gets .errors appended (results -> results.errors). Invariant: distinct
    outputs get distinct errors files (a name that ends in .jsonl and one that does not never map to one file), so
    one job's --overwrite never deletes another's failed lines."""
    name = output.name
    if name.endswith(".jsonl"):
        return output.with_name(name[: -len(".jsonl")] + ".errors.jsonl")
    return output.with_name(name + ".errors")


def _earlier_errors_path(output: Path) -> Path:
    """The default errors file of earlier versions: results -> results.errors.jsonl, the one of
    results.jsonl too (`errors_path_for` now tells them apart)."""
    name = output.name
    return output.with_name(name.removesuffix(".jsonl") + ".errors.jsonl")


def default_errors_path(output: Path) -> Path:
    """The errors file of `output`'s job where no --errors-file is given: `errors_path_for`, save for an output an
    earlier version began under its old default (`_earlier_errors_path`, which its state file records), whose
    failed lines stay where they are, so that the same command resumes it."""
    new, earlier = errors_path_for(output), _earlier_errors_path(output)
    if new == earlier:
        return new
    recorded = _state_or_empty(state_path_for(output)).get("errors_file")
    return earlier if recorded == str(earlier.resolve()) else new


def _state_or_empty(state_path: Path) -> dict[str, Any]:
    """A state file's JSON object as far as it can be read, else {} (none there, unreadable, not an object): for
    checks that only ask what it records, where `_read_state` would refuse the job."""
    try:
        state = json.loads(state_path.read_bytes())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _refuse_deleting_anothers_errors(output: Path, errors: Path) -> None:
    """Raise JobError where starting `output` over would empty `errors` (its errors file, or the output itself)
    while it holds the failed lines of another output, whose state file names it (an earlier version's
    shared default, or another job's --errors-file): that job could then never resume. The outputs looked at are
    those whose default errors file it may be."""
    if not (errors.is_file() and errors.stat().st_size > 0):
        return
    name = errors.name
    stem = name.removesuffix(".errors.jsonl") if name.endswith(".errors.jsonl") else name.removesuffix(".errors")
    if stem == name:
        return
    for other in {errors.with_name(stem + ".jsonl"), errors.with_name(stem)}:
        if same_file(other, output) or not state_path_for(other).is_file():
            continue
        if _state_or_empty(state_path_for(other)).get("errors_file") == str(errors.resolve()):
            what, instead = (("the output", "choose another -o") if errors == output else
                             ("its errors file", "give this job its own --errors-file"))
            raise JobError(f"refusing to start {str(output)!r} over: {what} {str(errors)!r} holds the "
                           f"failed lines of {str(other)!r} (its state file names it), which --overwrite would "
                           f"delete; {instead}")


def _refuse_deleting_errors_not_its_own(output: Path, errors: Path, state_path: Path) -> None:
    """Raise JobError where starting `output` over would empty an errors file of the user's choosing (not the
    output's own default) that holds records its state file does not name as this job's: another job's failed lines
    (its --errors-file, named anything: no state file can be found from the errors file), which that job could then
    never resume, or a file put there. The state file names it as this job's when it records this path and, where
    it recorded one (STATE_VERSION 3 on), the hash of the file's first line (`_written_by_another`, as a resume
    reads it)."""
    if same_file(errors, default_errors_path(output)) or not (errors.is_file() and errors.stat().st_size > 0):
        return
    state = _state_or_empty(state_path)
    if state.get("errors_file") == str(errors.resolve()) and not _written_by_another(state, errors):
        return
    raise JobError(f"refusing to start {str(output)!r} over: its errors file {str(errors)!r} holds failed lines "
                   "this job did not write (another job's --errors-file, or a file put there), which --overwrite would "
                   "delete; move it away or give this job its own --errors-file")


@dataclass
class ResumeState:
    done_ids: set[str | int] = field(default_factory=set)
    """Ids (or custom_ids) of lines already answered, as JSON values (`typed_ids`) or as strings."""
    typed_ids: bool = True
    """False for an output whose state file an older version wrote (no STATE_VERSION): it wrote an integer
    id as a string, so its ids are matched as strings (`is_done`)."""
    done_error_lines: set[int] = field(default_factory=set)
    """Line numbers of lines that already have an error record."""
    num_records: int = 0
    repaired_bytes: int = 0
    """Bytes of a torn last line that were cut off (of the output and its errors file together)."""
    repaired_files: list[Path] = field(default_factory=list)
    """The files whose torn last line was cut (the output, its errors file)."""
    start_output: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    """Where `prepare_output(defer_start=True)` found a job that starts its output afresh: emptying it (and its errors
    file) and writing the new state file, left for `begin`; until then the job's files are as they were."""
    earlier: Callable[[], ResumeState | None] | None = field(default=None, compare=False, repr=False)
    """Where --overwrite found earlier records (until `begin` they stay): what they hold, read when asked
    (`_earlier_records`: None where they answer another input, or cannot be read)."""
    input_read: tuple[int, str] | None = field(default=None, compare=False, repr=False)
    """The input's size and SHA-256 when `prepare_output` tied the job to it (None: not tied): the job's reading of
    its lines must read those bytes (`InputChanged`)."""

    def begin(self) -> None:
        """Start the output where `prepare_output` left that for later (once; nothing where it did not): `run` calls it
        once the model has loaded, so a model that cannot load leaves earlier results (--overwrite) and a fresh
        output (no file, no state file) as they were. A JobError where it cannot be written."""
        start, self.start_output = self.start_output, None
        if start is not None:
            start()

    @property
    def num_lines_recorded(self) -> int:
        """Lines with a record: answered, or recorded with an error."""
        return len(self.done_ids) + len(self.done_error_lines)

    def is_done(self, request_id: str | int) -> bool:
        """Whether the line of this id was answered by an earlier run."""
        return (request_id if self.typed_ids else str(request_id)) in self.done_ids


STATE_VERSION = 3
"""Version 3 (session 35) records the errors file the job began (`ERRORS_FIRST_LINE`: absent while it has none);
version 2 (session 26) records the options and writes ids as their JSON values; a state file without
a version (1) wrote integer ids as strings and no options, and resumes as before (unchecked options)."""


def input_fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return {"input_size": size, "input_sha256": digest.hexdigest()}


def input_read_of(fingerprint: dict[str, Any]) -> tuple[int, str]:
    """The input's size and SHA-256 in a fingerprint (`input_fingerprint`'s keys, as a state file records them):
    what the job's reading of its lines must read (`ResumeState.input_read`). KeyError, TypeError or ValueError
    where the record lacks them."""
    return int(fingerprint["input_size"]), str(fingerprint["input_sha256"])


_START_OVER = "pass --overwrite to start over (finished lines are then recomputed)"


class OutputLock:
    """An exclusive lock (flock) on the output file for the whole job, so that a second `batchllm run`
    on the same output is refused instead of interleaving records with the first. The lock goes with
    the process: a killed job leaves nothing to clean up. `for_directory` locks a `run --ray` output directory
    the same way, through its `DIRECTORY_LOCK` file (the message names the directory).

    An existing output that cannot be opened to write (a read-only mount, an archived job) is locked through
    a read-only handle: a finished job needs no write access to be found complete. `write_problem` then says
    why it cannot be written (`prepare_output` raises it where the job would write). A directory lock that cannot
    be made there (a read-only directory without one) is not held: no job can write that directory either.

    Invariant: while held, `path` names the locked file (a lock taken on a file another process unlinked in the
    meantime is dropped and taken again), so two jobs never both hold the lock of one output."""

    def __init__(self, output: Path, path: Path | None = None) -> None:
        self.output = output  # what the messages name
        self.path = output if path is None else path  # the file locked
        self._file = None
        self._created = False
        self._made_folders: list[Path] = []  # (the folders `_open` made for the lock file, outermost first)
        self.write_problem: str | None = None

    @classmethod
    def for_directory(cls, directory: Path) -> OutputLock:
        """The lock of a `run --ray` output directory: its `DIRECTORY_LOCK` file, removed when the lock is released."""
        return cls(directory, directory / DIRECTORY_LOCK)

    def __enter__(self) -> OutputLock:
        if self.path == self.output:
            _refuse_unlockable_output(self.output)
        for _ in range(10):  # (another job unlinked the file between our open and our lock: lock the new one)
            self._file = self._open()
            if self._file is None or self._lock():
                return self
        raise JobError(f"cannot lock the output {str(self.output)!r}: its lock file keeps being replaced")

    def _lock(self) -> bool:
        """Take the lock on the open file; False where the path no longer names it (then closed: try again)."""
        try:
            _lock_exclusively(self._file, self.path)
        except BlockingIOError:
            self._file.close()
            raise JobError(f"another batchllm run is writing {str(self.output)!r} (it holds its lock); "
                           "wait for it to finish or choose another -o") from None
        except OSError as e:
            self._file.close()
            if self.write_problem is not None:  # a read-only handle some filesystems will not lock (NFS): as if
                raise JobError(self.write_problem) from None  # it could not be opened
            raise JobError(f"cannot lock the output {str(self.output)!r}: {e.strerror or e}") from None
        same = _names_the_open_file(self.path, self._file)
        if not same:
            self._file.close()
        return same

    def _open(self):
        """The lock file opened to append (created if missing, never truncated), else, where it exists, to read
        (`write_problem` says why it could not be written); None for a directory's lock that cannot be made in a
        directory that exists; a JobError where neither is possible."""
        try:
            if not self._made_folders:
                self._made_folders = [p for p in reversed(self.path.parents) if not p.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._created = not self.path.exists()
            return open(self.path, "ab")
        except OSError as e:  # a read-only or missing place, a parent that is a file
            problem = f"cannot write the output {str(self.output)!r}: {_os_problem(self.path, e)}"
            if not self.path.is_file():
                if self.path != self.output and self.output.is_dir():
                    self._created, self.write_problem = False, problem
                    return None
                raise JobError(problem) from e
        try:
            file = open(self.path, "rb")
        except OSError:
            raise JobError(problem) from None
        self._created, self.write_problem = False, problem
        return file

    def __exit__(self, *exc) -> None:
        if self._file is None:
            return
        try:
            if self.path == self.output:
                if self._created and not state_path_for(self.output).exists() and self.output.stat().st_size == 0:
                    self.output.unlink()  # a job refused before it began leaves no trace
            else:  # (safe while held: a job that opened it meanwhile finds it unlinked once it locks it, `_lock`)
                self.path.unlink(missing_ok=True)
            for folder in reversed(self._made_folders):  # (those a job's files are in stay: rmdir takes only empty)
                folder.rmdir()
        except OSError:  # (a folder not empty, a name the filesystem refuses: the job's own error is the one to see)
            pass
        finally:
            self._file.close()  # closing releases the lock


LOCKS_NOT_SUPPORTED = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})
"""flock's errors on a filesystem that takes no locks (Lustre mounted without flock, NFS without its lock
daemon, some FUSE mounts): the job runs without the lock (`_warn_unlocked`)."""


def _lock_exclusively(file, path: Path) -> None:
    """flock `file` (open at `path`) exclusively, not waiting: BlockingIOError where another process holds it, another
    OSError where it cannot be locked; on a filesystem that takes no locks (`LOCKS_NOT_SUPPORTED`), a warning and
    no lock (Lustre without -o flock, NFS without lockd: the job runs, as vLLM's always does, unlocked)."""
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise
    except OSError as e:
        if e.errno not in LOCKS_NOT_SUPPORTED:
            raise
        _warn_unlocked(path, e)


def _warn_unlocked(path: Path, error: OSError) -> None:
    print(f"batchllm: warning: cannot lock {str(path)!r} ({error.strerror or error}: this filesystem takes no file "
          "locks); running without the lock, so make sure no other batchllm run writes the same files",
          file=sys.stderr)


def _os_problem(path: Path, error: OSError) -> str:
    """Why `path` could not be made, in words: where one of its parents is a file, that parent by name (mkdir
    says only "File exists" or "Not a directory", naming neither path), else the error's own words."""
    if blocker := next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None):
        return f"{str(blocker)!r} is a file, not a folder"
    return error.strerror or str(error)


def _refuse_unlockable_output(output: Path) -> None:
    """A JobError where -o names no file a job can append to and resume from (a directory, a device, a pipe)."""
    if output.is_dir():
        raise JobError(f"cannot write the output {str(output)!r}: it is a directory; -o names a file")
    if output.exists() and not output.is_file():  # /dev/null, a pipe: no resume, no fsync
        raise JobError(f"cannot write the output {str(output)!r}: it is not a regular file (a device or "
                       "a pipe), and a job resumes from its output file; -o names a file")


def refuse_unusable_file_names(output: Path, errors: Path) -> None:
    """Raise JobError where `run`'s output or errors file names a job's state file (`-o out.jsonl.batchllm-state`
    with --overwrite would destroy another job's, which then cannot resume) or a `run --ray` directory's lock file
    (`DIRECTORY_LOCK`, which that job removes), or where a name the job writes beside
    the output (its state file while it is rewritten, the errors file) is longer than the filesystem allows: refused
    before anything is made, naming the -o to shorten."""
    for path, flag in ((output, "-o"), (errors, "--errors-file")):
        if path.name.endswith((STATE_SUFFIX, STATE_SUFFIX + STATE_TMP_SUFFIX)):
            raise JobError(f"{flag} {str(path)!r} names a job's state file ({STATE_SUFFIX}, which ties an output to "
                           f"its input for a resume); choose another {flag}")
        if path.name == DIRECTORY_LOCK:  # (a `run --ray` job on the folder removes its lock file when it ends)
            raise JobError(f"{flag} {str(path)!r} names the lock file of a `run --ray` output directory; choose "
                           f"another {flag}")
    for given, name, flag in ((output, state_path_for(output).name + STATE_TMP_SUFFIX, "-o"),
                              (errors, errors.name, "-o (its errors file is named after it) or --errors-file")):
        if (size := len(os.fsencode(name))) > (limit := _name_limit(given.parent)):
            what = "the output's" if given is output else "the errors file's"
            raise JobError(f"{what} name {given.name!r} is too long: the job writes {name!r} ({size} bytes), and a "
                           f"file name there has at most {limit} bytes; choose a shorter {flag}")


def _name_limit(folder: Path) -> int:
    """The longest file name (in bytes) the filesystem of `folder` (or of its nearest existing parent) takes."""
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), Path("."))
    try:
        return os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def same_file(a: Path, b: Path) -> bool:
    """True when both paths name one file: the same path, a link, or another name of the same inode."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def refuse_output_onto_input(output: Path, input_path: Path) -> None:
    """Raise JobError when the output names the input file (any path to it), even with --overwrite, or is
    "-" or a process's file descriptor (/dev/stdout and the like, which a job cannot resume from).
    The CLI calls it before `OutputLock`, which opens the output for append: with a read-only input
    that open would fail first with a message that does not say what is wrong."""
    if str(output) == "-":  # (a file named "-" in the working directory is not what a user means)
        raise JobError("results cannot go to standard output (-o -): a job resumes from its output file; "
                       "give -o a path")
    if is_a_url(output):  # (else a folder named "https:" would be made)
        raise JobError(f"-o {as_given_url(output)!r} is a URL: results are written to a local file (a job "
                       "resumes from it), not uploaded (vLLM's run-batch uploads to an http(s) URL); write a file "
                       "and upload it when the job is done (e.g. curl -T out.jsonl URL, aws s3 cp out.jsonl URL)")
    if is_a_standard_stream(output):  # (/dev/stdout redirected to a file is a regular file)
        raise JobError(f"results cannot go to {str(output)!r}: a job resumes from its output file, with a state file "
                       "beside it; give -o the path of a file")
    if same_file(output, input_path):
        raise JobError(f"refusing to write the output onto the input file {str(input_path)!r} "
                       "(even with --overwrite: it would destroy the input); choose another -o")


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")
"""A URL's scheme as a Path keeps it (https:/, s3:/, gs:/; one letter, a Windows drive, is not one)."""


def is_a_url(path: Path) -> bool:
    """Whether a path given on the command line is a URL: http(s), which vLLM's run-batch reads and writes, or an
    object store's (s3://, gs://), which a Ray user may take for a place results go."""
    return _URL.match(str(path)) is not None


def as_given_url(path: Path) -> str:
    """An `is_a_url` path as the URL it was given as (a Path folds the "//" after the scheme, and file:///'s "///")."""
    if is_a_file_url(path):
        return "file://" + file_url_path(path)
    return str(path).replace(":/", "://", 1)


def is_a_file_url(path: Path) -> bool:
    return str(path).lower().startswith("file:/")


def file_url_path(path: Path) -> str:
    """The local path a file:// URL names (file:///tmp/x.jsonl, folded by Path to file:/tmp/x.jsonl: /tmp/x.jsonl)."""
    return "/" + str(path)[len("file:/"):].lstrip("/")


_STANDARD_STREAM = re.compile(r"/dev/(stdin|stdout|stderr|fd/\d+)|/proc/[^/]+/fd/\d+")


def is_a_standard_stream(path: Path) -> bool:
    """Whether `path`, or the link it is, names a process's file descriptor (/dev/stdout, /dev/fd/1,
    /proc/self/fd/1); other files under /dev (/dev/shm's) are files."""
    named = os.path.abspath(path)
    if _STANDARD_STREAM.fullmatch(named):
        return True
    try:
        target = os.readlink(named)
    except OSError:
        return False
    return bool(_STANDARD_STREAM.fullmatch(os.path.normpath(os.path.join(os.path.dirname(named), target))))


def stream_words(path: Path) -> str:
    """What an `is_standard_input` path is, in words: "standard input" (`-`, /dev/stdin, descriptor 0), else "a pipe"
    (another descriptor: `<(cat x.jsonl)` is /dev/fd/63)."""
    if str(path) == "-" or re.fullmatch(r"/dev/stdin|/dev/fd/0|/proc/[^/]+/fd/0", os.path.abspath(path)):
        return "standard input"
    return "a pipe"


def is_standard_input(path: Path) -> bool:
    """Whether an input path names standard input as a stream: `-`, or /dev/stdin and the like where they are no
    regular file (a pipe); a file redirected in (`< in.jsonl`) is that file."""
    return str(path) == "-" or (is_a_standard_stream(path) and not path.is_file())


def prepare_output(output: Path, input_path: Path, overwrite: bool, errors: Path | None = None,
                   options: dict[str, Any] | None = None, num_lines: int | None = None,
                   write_problem: str | None = None,
                   writes_errors: Callable[[], bool] | None = None, defer_start: bool = False) -> ResumeState:
    """Validate or create the output (and its errors file) for this input and these `options` (JSON
    values; None: not checked); return what is already done. A state file of an older version (no
    options recorded) resumes under any. `num_lines`: the input's lines, where known; an output that records
    them all is only read, so a finished job needs no write access (a torn last line is still cut). Any other
    job must be able to write: `write_problem` (why the output cannot be written: `OutputLock.write_problem`) and
    an errors file that cannot be written are raised as JobErrors, before anything is written; the errors file only
    where the job may write one (`writes_errors`, asked only then; None: it may). `defer_start`: a fresh or
    overwritten output is started only by the returned state's `begin` (else here), after every check above."""
    refuse_output_onto_input(output, input_path)
    state_path = state_path_for(output)
    if errors is not None and any(same_file(errors, p) for p in (input_path, output, state_path)):
        if same_file(errors, default_errors_path(output)):  # (not chosen: -o's name chose it)
            raise JobError(f"the output's errors file would be {str(errors)!r} (-o's name with .errors), which is "
                           f"the input; choose another -o, or give --errors-file another path")
        raise JobError(f"the errors file {str(errors)!r} must differ from the input, the output and its state file; "
                       "choose another --errors-file")
    if errors is not None and errors.exists() and not errors.is_file() and not errors.is_dir():
        raise JobError(f"cannot write the errors file {str(errors)!r}: it is not a regular file (a device or a pipe), "
                       "which a job would remove to start it over and cannot resume from; --errors-file names a file")
    if errors is not None:
        _refuse_errors_file_of_another_output(output, errors)
    fingerprint = _job_fingerprint(input_path, options)
    if errors is not None:
        fingerprint["errors_file"] = str(errors.resolve())
    read = input_read_of(fingerprint)
    existing = [p for p in (output, errors) if p is not None and p.is_file() and p.stat().st_size > 0]
    if not existing and not overwrite and num_lines == 0 and _is_this_jobs_empty_output(output, fingerprint):
        return ResumeState(input_read=read)  # a finished job of an empty input: nothing to write, no write access
    if existing and not overwrite:
        resume = _resume(output, errors, state_path, fingerprint, input_path)
        if num_lines is None or resume.num_lines_recorded < num_lines:
            _refuse_unwritable_files(write_problem, errors, writes_errors)
            _record_errors_file(state_path, fingerprint)
        resume.input_read = read
        return resume
    _refuse_unwritable_files(write_problem, errors, writes_errors)
    _refuse_deleting_anothers_errors(output, output)
    if errors is not None:
        _refuse_deleting_anothers_errors(output, errors)
        _refuse_deleting_errors_not_its_own(output, errors, state_path)
    fresh = ResumeState(start_output=lambda: _start_output(output, errors, state_path, fingerprint), input_read=read)
    if existing:
        fresh.earlier = lambda: _earlier_records(output, errors, state_path, fingerprint)
    if not defer_start:
        fresh.begin()
    return fresh


def _earlier_records(output: Path, errors: Path | None, state_path: Path,
                     fingerprint: dict[str, Any]) -> ResumeState | None:
    """What the output and errors file that --overwrite has not yet started over hold (`ResumeState.earlier`), read
    only (a torn last line is left, and not counted); None where their state file ties them to another input than
    `fingerprint`'s (their counts would not be of this input's lines), or they cannot be read."""
    try:
        state = _read_state(state_path, output)
        if (state["input_size"], state["input_sha256"]) != (fingerprint["input_size"], fingerprint["input_sha256"]):
            return None
        found = ResumeState(typed_ids=state.get("version", 1) >= 2)
        for path in (output, errors):
            if path is not None and path.is_file():
                with open(path, "rb") as f:
                    for number, raw in enumerate(f, start=1):
                        if raw.endswith(b"\n"):
                            _note_line(path, number, raw, found)
        return found
    except (OSError, JobError):
        return None


def _is_this_jobs_empty_output(output: Path, fingerprint: dict[str, Any]) -> bool:
    """Whether `output` is the empty output of this job (`fingerprint`: its state file says so), as a finished job of
    an empty input leaves it; anything else (no state file, another job's) is started afresh, as before."""
    if not output.is_file() or output.stat().st_size:
        return False
    try:
        state = _read_state(state_path_for(output), output)
        _refuse_another_job(output, state, fingerprint, output)
    except JobError:
        return False
    return state.get("errors_file", fingerprint.get("errors_file")) == fingerprint.get("errors_file")


def _resume(output: Path, errors: Path | None, state_path: Path, fingerprint: dict[str, Any],
            input_path: Path) -> ResumeState:
    """What the existing output (and errors file) of this job (`fingerprint`) already records, checked to be this
    job's; a JobError names what belongs to another job or is damaged."""
    if not (output.is_file() and output.stat().st_size > 0) and not state_path.exists():
        raise JobError(f"refusing to write into {str(errors)!r}: this errors file exists, but no "  # (no output yet)
                       f"{state_path.name} ties it to {str(output)!r}; choose another --errors-file or "
                       "remove it (--overwrite would delete it)")
    state = _read_state(state_path, output)
    _refuse_another_job(output, state, fingerprint, input_path)
    _refuse_another_errors_file(output, state, errors)
    resume = _scan_and_repair(output, ResumeState(typed_ids=state.get("version", 1) >= 2))
    if errors is not None and errors.is_file() and errors.stat().st_size > 0:
        _refuse_errors_written_by_another(output, state, errors)
        _scan_and_repair(errors, resume)
    return resume


def _refuse_unwritable_files(write_problem: str | None, errors: Path | None,
                             writes_errors: Callable[[], bool] | None = None) -> None:
    """Raise JobError where the output (`write_problem`), then the job's errors file (written at its first failed
    OpenAI line) could not be written; the errors file not where `writes_errors()` says the job writes none."""
    if write_problem is not None:
        raise JobError(write_problem)
    if errors is not None and (problem := later_write_problem(errors, "the errors file")):
        if writes_errors is None or writes_errors():
            raise JobError(problem)


def _start_output(output: Path, errors: Path | None, state_path: Path, fingerprint: dict[str, Any]) -> None:
    """Empty the output (and remove its errors file), then tie it to this job: in this order, a job killed
    between the steps leaves either the old state over an empty output, or the new one, never earlier results
    under the new options (--overwrite would have been undone by a resume). A JobError where it cannot be written."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        held = _hold_errors_file_to_remove(output, errors, state_path) if errors is not None else None
        try:  # (the errors file refused, nothing is emptied)
            with open(output, "wb") as f:
                f.flush()
                os.fsync(f.fileno())
            if held is not None:
                errors.unlink(missing_ok=True)  # empty, or --overwrite: opened again at the first error
        finally:
            if held is not None:
                held.close()
    except OSError as e:  # a full disk, a read-only place
        raise JobError(f"cannot write results to {str(output)}: {_os_problem(output, e)}") from e
    try:
        _write_state(state_path, fingerprint)
    except OSError as e:
        raise OutputWriteError.of_state_file(state_path, e) from e


def _hold_errors_file_to_remove(output: Path, errors: Path, state_path: Path):
    """The errors file, open and locked, for `_start_output` to remove once it has emptied the output (None where
    there is none): a file another job holds (its output, or its errors file since its first failed line) is
    refused, never removed from under it (that job's records went on into the removed file, lost), and
    `prepare_output`'s checks of its content are made again, since another job may have written it while this one
    loaded its model. Opened to write where it may be (an exclusive lock on a read-only handle fails on NFS); a
    filesystem that will not lock it leaves it unlocked, as before."""
    try:
        held = open(errors, "r+b")
    except FileNotFoundError:
        return None
    except PermissionError:  # (a read-only file in a folder the job may write: removed as before)
        held = open(errors, "rb")
    try:
        try:
            _lock_exclusively(held, errors)
        except BlockingIOError:
            raise JobError(f"refusing to start {str(output)!r} over: another batchllm run is writing its errors file "
                           f"{str(errors)!r} (it holds its lock); give each job its own --errors-file, or choose "
                           "another -o") from None
        except OSError:  # (a lock this filesystem refuses on this handle: unlocked, as before)
            pass
        _refuse_deleting_anothers_errors(output, errors)
        _refuse_deleting_errors_not_its_own(output, errors, state_path)
    except BaseException:
        held.close()
        raise
    return held


def _refuse_errors_file_of_another_output(output: Path, errors: Path) -> None:
    """Raise JobError where the errors file is another job's output (its state file is there): starting this job
    would delete that job's results, and its failed lines would be read by that job's resume as its own."""
    if state_path_for(errors).is_file():
        raise JobError(f"the errors file of {str(output)!r} would be {str(errors)!r}, the output of another job (its "
                       f"state file {state_path_for(errors).name} is there); give this job its own --errors-file, "
                       "or choose another -o")


def later_write_problem(path: Path, what: str) -> str | None:
    """Why `what` (a file written later in the job: the errors file at its first failed line, --stats at the end)
    could not be written at `path`, or None; its folder is made now. The file is opened, not asked about: root
    passes every permission check, and a place such as /proc refuses only the open. A file made here is removed."""
    if path.is_dir():
        return f"cannot write {what} {str(path)!r}: it is a directory; give a file path"
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        return f"cannot write {what} {str(path)!r}: {_os_problem(path, e)}"
    if not existed:
        path.unlink(missing_ok=True)
    return None


def directory_write_problem(directory: Path, what: str) -> str | None:
    """Why files could not be made in `directory` (`what` names it), or None: a probe file is created and
    removed (asked, root would pass every permission check). A missing folder is made, as the job would."""
    probe = directory / f".batchllm-write-check-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(probe, "x"):
            pass
    except OSError as e:
        return f"cannot write {what} {str(directory)!r}: {_os_problem(probe, e)}"
    probe.unlink(missing_ok=True)
    return None


def state_path_for(output: Path) -> Path:
    """The state file that ties an output file to its input and options."""
    return output.with_name(output.name + STATE_SUFFIX)


def job_state_path(directory: Path) -> Path:
    """The state file of a `run --ray` output directory."""
    return directory / ("job" + STATE_SUFFIX)


def recorded_option(state_path: Path, name: str) -> Any:
    """The value of option `name` recorded in a state file, or None where there is none (no file, no such option, or
    a file that cannot be read: the job's own check of it, `_read_state`, reports that)."""
    try:
        options = _read_state(state_path, state_path).get("options")
    except JobError:
        return None
    return options.get(name) if isinstance(options, dict) else None


def tie_directory_to_job(directory: Path, input_path: Path, options: dict[str, Any]) -> None:
    """`run --ray`'s output directory (shards, and a checkpoint by line number) tied to its input and
    options as `prepare_output` ties an output file: a state file inside it, checked on a restart that
    finds results there (any other file: shards, checkpoint entries), written anew where there are none (a first run,
    or one that failed before writing anything). Results without a state file are refused: another job,
    or an older version, wrote them."""
    state_path = job_state_path(directory)
    fingerprint = _job_fingerprint(input_path, options)
    ours = {state_path.name, state_path.name + STATE_TMP_SUFFIX}
    has_results = directory.is_dir() and any(p.is_file() and p.name not in ours for entry in job_entries(directory)
                                             for p in ([entry] if entry.is_file() else entry.rglob("*")))
    if has_results:
        if not state_path.exists():  # (`_read_state`'s refusal offers --overwrite, which --ray refuses here)
            raise JobError(f"refusing to write into {unowned_directory(directory)}")
        _refuse_another_job(directory, _read_state(state_path, directory), fingerprint, input_path)
        return
    directory.mkdir(parents=True, exist_ok=True)
    _write_state(state_path, fingerprint)


OVERWRITTEN = ".batchllm-overwritten"
"""`run --ray --overwrite`'s earlier results, set aside inside the output directory until a replica has loaded the
model (`set_aside_for_overwrite`); entries whose names begin so are no results of the job."""
_MOVING = OVERWRITTEN + ".moving"


def job_entries(directory: Path) -> list[Path]:
    """The entries of a `run --ray` output directory that are its job's (shards, checkpoint, state file): not what
    --overwrite set aside (`OVERWRITTEN`), nor the lock (`DIRECTORY_LOCK`, which must stay while it is held)."""
    return [p for p in directory.iterdir() if not p.name.startswith(OVERWRITTEN) and p.name != DIRECTORY_LOCK]


def set_aside_for_overwrite(directory: Path) -> None:
    """Start a `run --ray` directory over without losing what it holds until the model has loaded: every entry
    (shards, checkpoint, state file) moves into `OVERWRITTEN` (renames only: an output directory that is a mount point
    works too), so a restart runs every line, and `discard_overwritten` deletes it once a replica built its engine;
    `restore_overwritten` puts it back if none did. The state file moves last and the set-aside becomes `OVERWRITTEN`
    by one rename, so a process killed midway leaves `_MOVING`, which `recover_overwrite` moves back. Where
    `OVERWRITTEN` exists already (an earlier --overwrite whose model never loaded, its process killed), it is kept: the
    rest holds no results (no model ran) and is deleted."""
    aside, moving, state = directory / OVERWRITTEN, directory / _MOVING, job_state_path(directory)
    others = job_entries(directory)
    if aside.exists():
        for entry in others:
            _remove(entry)
        return
    moving.mkdir()
    for entry in sorted(others, key=lambda p: p == state):  # the state file last
        os.replace(entry, moving / entry.name)
    os.replace(moving, aside)


def set_aside_answers_the_job(directory: Path, input_path: Path) -> bool:
    """Whether what `set_aside_for_overwrite` kept in `directory` was written for the job that `directory`'s own state
    file now names: the same input and options, as a resume would take it (`_refuse_another_job`), so that once put
    back (`restore_overwritten`) its records are lines of this job. Read-only; False where either state file is
    missing or cannot be read."""
    try:
        earlier = _read_state(job_state_path(directory / OVERWRITTEN), directory)
        _refuse_another_job(directory, earlier, json.loads(job_state_path(directory).read_bytes()), input_path)
    except (JobError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return True


def discard_overwritten(directory: Path) -> None:
    """Delete what `set_aside_for_overwrite` kept (nothing where there is none): a replica calls it once its engine
    is built, and the driver once the job has finished. Claimed by one rename first, so that `restore_overwritten`
    never restores a half-deleted directory; safe to call from every replica at once."""
    claimed = directory / f"{OVERWRITTEN}.discarding-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(directory / OVERWRITTEN, claimed)
    except FileNotFoundError:
        return
    shutil.rmtree(claimed, ignore_errors=True)


def restore_overwritten(directory: Path) -> bool:
    """Put back what `set_aside_for_overwrite` kept, where no replica has loaded the model (`discard_overwritten` did
    not claim it): the new job's entries (its state file, an empty checkpoint: no model ran, so no shard) are deleted
    and the earlier ones return. Whether anything was restored."""
    if not (directory / OVERWRITTEN).is_dir():
        return False
    try:
        os.replace(directory / OVERWRITTEN, directory / _MOVING)
    except FileNotFoundError:
        return False
    for entry in job_entries(directory):
        _remove(entry)
    recover_overwrite(directory)
    return True


def recover_overwrite(directory: Path) -> None:
    """Finish what a killed process left of `set_aside_for_overwrite` or `restore_overwritten` (`_MOVING`): its
    entries move back (replacing a same-named entry of the new job), the state file last; and delete what a killed
    `discard_overwritten` had claimed. Nothing where neither is there."""
    moving = directory / _MOVING
    if moving.is_dir():
        for entry in sorted(moving.iterdir(), key=lambda p: p.name == job_state_path(directory).name):
            if (directory / entry.name).exists():
                _remove(directory / entry.name)
            os.replace(entry, directory / entry.name)
        moving.rmdir()
    for claimed in directory.glob(OVERWRITTEN + ".discarding-*"):
        shutil.rmtree(claimed, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def unowned_directory(directory: Path) -> str:
    """What is wrong with a `run --ray` output directory that holds files but no state file (another program's
    files, or an older version's shards), and what to do: neither a resume nor --overwrite touches it."""
    return (f"{str(directory)!r}: it holds files but no {job_state_path(directory).name}, so no batchllm --ray job "
            "wrote it; give a new or empty directory as -o, or remove these files")


def _job_fingerprint(input_path: Path, options: dict[str, Any] | None) -> dict[str, Any]:
    """What a state file holds: the input's path, size and SHA-256, the options (None: not recorded) and
    STATE_VERSION."""
    fingerprint = {"input": str(input_path.resolve()), **input_fingerprint(input_path)}
    if options is not None:
        fingerprint["options"] = options
    return {**fingerprint, "version": STATE_VERSION}


def _write_state(state_path: Path, fingerprint: dict[str, Any]) -> None:
    """Write a state file atomically and durably: a temporary file, synced, renamed over it, then its folder synced
    (records are synced as they are written; a power loss must not leave them without the state file that a resume
    needs). An OSError (a full disk) leaves the state file as it was and no temporary file."""
    tmp = state_path.with_name(state_path.name + STATE_TMP_SUFFIX)
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(fingerprint) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, state_path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(state_path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename or a creation in `folder` durable (fsync of the folder); skipped where the filesystem cannot."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # (some filesystems refuse a folder's fsync: nothing more can be done there)
        pass
    finally:
        os.close(descriptor)


def _change_of(state: dict[str, Any], fingerprint: dict[str, Any]) -> str:
    """How the input changed: its size, or where the size is the same (lines reordered, a word edited), its
    content's hash."""
    then, now = state.get("input_size"), fingerprint["input_size"]
    if then != now:
        return f"{then} bytes then, {now} now"
    return f"the same {now} bytes, other content: SHA-256 {str(state.get('input_sha256'))[:12]}... then, " \
           f"{fingerprint['input_sha256'][:12]}... now"


def _refuse_another_job(output: Path, state: dict[str, Any], fingerprint: dict[str, Any], input_path: Path) -> None:
    """Raise JobError when `state` (of `output`) belongs to another input or was answered under other options."""
    if (state.get("input_size"), state.get("input_sha256")) != (fingerprint["input_size"], fingerprint["input_sha256"]):
        if state.get("input") == fingerprint["input"]:
            raise JobError(
                f"refusing to resume into {str(output)!r}: its input {str(input_path)!r} has changed since the "
                f"output was written ({_change_of(state, fingerprint)}), so its results may answer other lines; "
                "pass --overwrite to start over, or choose another -o"
            )
        raise JobError(
            f"refusing to resume into {str(output)!r}: it was written for a different input "
            f"({state.get('input')!r}, {state.get('input_size')} bytes), not {str(input_path)!r}; "
            "choose another -o or pass --overwrite"
        )
    _refuse_other_options(output, state.get("options"), fingerprint.get("options"))


def _record_errors_file(state_path: Path, fingerprint: dict[str, Any]) -> None:
    """Record in the state file the errors file this run writes, where it is another than the one recorded (a
    renamed --errors-file, a copied job's own): a later resume then reads, or is refused for, the file that holds the
    failed lines, never runs them again into the old one. Called only where the job will write."""
    state = json.loads(state_path.read_bytes())
    if "errors_file" in fingerprint and state.get("errors_file") != fingerprint["errors_file"]:
        try:
            _write_state(state_path, {**state, "errors_file": fingerprint["errors_file"]})
        except OSError as e:
            raise OutputWriteError.of_state_file(state_path, e) from e


def _refuse_another_errors_file(output: Path, state: dict[str, Any], errors: Path | None) -> None:
    """Raise JobError when the job's failed lines are in another errors file than `errors` (the one its state
    file records, still holding records): resumed so, they would run and be written again into this one. An
    `errors` that begins as the job's errors file began (`ERRORS_FIRST_LINE`: a copied or restored job's copy of
    it) is the job's own, wherever the recorded one is (the state file then records it, where the job writes)."""
    recorded = state.get("errors_file")
    if not isinstance(recorded, str) or errors is None or Path(recorded) == errors.resolve():
        return
    if ERRORS_FIRST_LINE in state and errors.is_file() and _first_line_hash(errors) == state[ERRORS_FIRST_LINE]:
        return
    if Path(recorded).is_file() and Path(recorded).stat().st_size > 0:
        raise JobError(f"refusing to resume into {str(output)!r}: its failed lines are in {recorded!r}, not "
                       f"{str(errors)!r}; resume with --errors-file {recorded}, or move that file there")


ERRORS_FIRST_LINE = "errors_file_first_line"
"""The state-file key of the errors file this job began: the SHA-256 of its first record's line. Content, not the
file's inode: a copied or restored job is still the same job."""


def claim_errors_file(output: Path, errors_file, first_record: bytes) -> None:
    """`ResultWriter`'s `on_open` for the errors file of `output`'s job, before its first record of this run: hold
    an exclusive lock on it for the job (another job writing the same --errors-file now is refused), and record in
    the state file the hash of its first line where the job begins it; a file holding another job's records is
    refused (`OutputWriteError`-free: a JobError), never appended to."""
    path = Path(errors_file.name)
    try:
        _lock_exclusively(errors_file, path)
    except BlockingIOError:
        raise JobError(f"another batchllm run is writing the errors file {str(path)!r}; give each job its own "
                       "--errors-file") from None
    except OSError as e:
        raise OutputWriteError(path, e) from e
    if not _names_the_open_file(path, errors_file):  # (another job's start removed it between our open and lock)
        raise JobError(f"the errors file {str(path)!r} was removed while this job opened it (another batchllm run "
                       "started over it); give each job its own --errors-file")
    state_path = state_path_for(output)
    try:
        _claim_in_state_file(output, path, state_path, first_record)
    except OSError as e:  # a full disk while the state file is rewritten: named, and the job resumes from it
        raise OutputWriteError.of_state_file(state_path, e) from e


def _names_the_open_file(path: Path, file) -> bool:
    """Whether `path` still names the open `file` (not removed, nor replaced by another file, since it was opened)."""
    try:
        return os.stat(path).st_ino == os.fstat(file.fileno()).st_ino
    except FileNotFoundError:
        return False


def _claim_in_state_file(output: Path, path: Path, state_path: Path, first_record: bytes) -> None:
    """`claim_errors_file`'s record in the state file of the errors file's first line (or its refusal)."""
    state = json.loads(state_path.read_bytes())
    first = _first_line_hash(path)
    if first is None:
        _write_state(state_path, {**state, ERRORS_FIRST_LINE: hashlib.sha256(first_record).hexdigest()})
    elif ERRORS_FIRST_LINE not in state and state.get("version", 1) < 3:  # begun by a version that recorded none:
        _write_state(state_path, {**state, ERRORS_FIRST_LINE: first})   # its records are taken as its own, as then
    elif state.get(ERRORS_FIRST_LINE) != first:
        raise JobError(_foreign_errors_message(output, path))


def _first_line_hash(path: Path) -> str | None:
    """The SHA-256 of the file's first complete line (newline included), None where it holds none."""
    with open(path, "rb") as f:
        line = f.readline()
    return hashlib.sha256(line).hexdigest() if line.endswith(b"\n") else None


def _foreign_errors_message(output: Path, errors: Path) -> str:
    return (f"refusing to write {str(output)!r}'s failed lines into {str(errors)!r}: it holds records this job did "
            "not write (another job's --errors-file, or a file put there), which a resume would read as this job's "
            "failed lines; move it away or give each job its own --errors-file")


def _refuse_errors_written_by_another(output: Path, state: dict[str, Any], errors: Path) -> None:
    """Raise JobError when `errors` holds records this job did not write: its first line is not the one the state
    file recorded (none: the job began no errors file). Read as this job's, another job's failed lines would be
    skipped, never answered. State files written before the errors file was recorded (STATE_VERSION < 3) are not
    checked."""
    if _written_by_another(state, errors):
        raise JobError(_foreign_errors_message(output, errors))


def _written_by_another(state: dict[str, Any], errors: Path) -> bool:
    """Whether `errors` holds records the job of `state` did not write: its first line is not the one the state
    recorded (none: the job began no errors file). False for a state written before the errors file was recorded
    (STATE_VERSION < 3, no hash), which cannot tell."""
    if state.get("version", 1) < 3 and ERRORS_FIRST_LINE not in state:
        return False
    first = _first_line_hash(errors)
    return first is not None and state.get(ERRORS_FIRST_LINE) != first


def _read_state(state_path: Path, output: Path) -> dict[str, Any]:
    """The state file beside an output that exists, checked for its form; a JobError says what is wrong."""
    try:
        state = json.loads(state_path.read_bytes())
    except FileNotFoundError:
        raise JobError(
            f"refusing to resume into {str(output)!r}: it exists but has no {state_path.name}, so it may "
            "belong to another job; remove it, choose another -o, or pass --overwrite"
        ) from None
    except OSError as e:
        raise JobError(f"cannot read {str(state_path)!r}: {e.strerror}") from e
    except ValueError as e:
        raise JobError(f"the state file {str(state_path)!r} is damaged ({e}); {_START_OVER}") from e
    if not isinstance(state, dict) or not {"input_size", "input_sha256"} <= set(state):
        raise JobError(f"the state file {str(state_path)!r} is damaged (not an object with input_size and "
                       f"input_sha256); {_START_OVER}")
    version = state.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise JobError(f"the state file {str(state_path)!r} is damaged (its version is not a number); "
                       f"{_START_OVER}")
    return state


_OPTION_NOTES = {"openai_max_tokens": " (the max_tokens of OpenAI lines without one, unless --max-tokens gives "
                                      "one)",
                 "response_role": " (unset: assistant, the default)"}
"""What a recorded option that is no command-line option stands for, in a refusal."""

_SAME_VALUES = {"kv_cache_dtype": {alias: FP8_KV_CACHE_DTYPES[0] for alias in FP8_KV_CACHE_DTYPES},
                "load_format": {"safetensors": "auto"}, "dtype": DTYPE_ALIASES}
"""Recorded options' spellings of one value (vLLM's aliases, as the config declares them), compared as one: a job
resumes under either (`cli.results_options` records dtype's as one already; an older record may hold either)."""

_NO_LONGER_RECORDED = frozenset({"trust_remote_code"})
"""Options earlier versions recorded that decide nothing (trust_remote_code: no code of a model directory runs
here), left out of the comparison so that their outputs resume with the flag given or not."""


def _refuse_other_options(output: Path, recorded: Any, options: dict[str, Any] | None) -> None:
    """Raise JobError naming each option whose value differs from the one `output` was written with."""
    if recorded is None or options is None:
        return
    if not isinstance(recorded, dict):
        raise JobError(f"the state file of {str(output)!r} is damaged (its options are not an object); "
                       f"{_START_OVER}")
    changed = [f"{name}{_OPTION_NOTES.get(name, '')} {_shown(recorded.get(name))} -> {_shown(options.get(name))}"
               for name in sorted((set(recorded) | set(options)) - _NO_LONGER_RECORDED)
               if _canonical(name, recorded.get(name)) != _canonical(name, options.get(name))]
    if changed:
        raise JobError(f"refusing to resume into {str(output)!r}: its finished lines were answered with other "
                       f"options ({'; '.join(changed)}); run with the options it was written with to resume, "
                       f"or {_START_OVER}")


def _canonical(name: str, value: Any) -> Any:
    """A recorded option's value in one spelling (`_SAME_VALUES`); recorded values are any JSON, and only strings
    have aliases (a list is not looked up: it cannot be hashed)."""
    return _SAME_VALUES.get(name, {}).get(value, value) if isinstance(value, str) else value


def _shown(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value)


def _scan_and_repair(output: Path, state: ResumeState | None = None) -> ResumeState:
    """Cut a torn last line of `output` and add its records to `state` (a new one when None)."""
    state = state or ResumeState()
    end, torn = 0, 0
    with open(output, "rb") as f:  # one line in memory at a time: outputs with logprobs run to many GB
        for line_number, raw in enumerate(f, start=1):  # (read-only: a complete job needs no write access)
            if not raw.endswith(b"\n"):  # the last line, torn by a kill
                torn = len(raw)
                break
            end += len(raw)
            _note_line(output, line_number, raw, state)
    if torn:
        try:
            with open(output, "rb+") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise JobError(f"cannot cut the torn last line of {str(output)!r} ({torn} bytes): "
                           f"{e.strerror or e}") from e
        state.repaired_bytes += torn
        state.repaired_files.append(output)
    return state


def _note_line(output: Path, line_number: int, raw: bytes, state: ResumeState) -> None:
    """Add the record of one complete output line to `state`; a line this program did not write is a JobError."""
    if raw.strip():
        try:
            record = json.loads(raw)
            problem = _record_problem(record)
        except (ValueError, RecursionError) as e:
            problem = f"not JSON: {e}"
        if problem:
            raise JobError(f"the output {str(output)!r} is damaged at line {line_number} ({problem}), so it "
                           f"cannot be resumed; {_START_OVER}")
        state.num_records += 1
        _note_done(record, state)


def _record_problem(record: Any) -> str | None:
    """Why a line of an output file is not a record this program writes, or None."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    error = record.get("error")
    if error is not None and not isinstance(error, dict):
        return "'error' is neither null nor an object"
    if error and not isinstance(error.get("line", 0), int):
        return "'error.line' is not a line number"
    rid = record.get("custom_id", record.get("id"))
    if not error and not isinstance(rid, (str, int)):
        return "a result without a string id"
    return None


def _note_done(record: dict, state: ResumeState) -> None:
    error = record.get("error")
    if error:
        line = error.get("line")
        if line is None:
            match = _LINE_IN_MESSAGE.match(str(error.get("message", "")))
            line = int(match.group(1)) if match else None
        if line is not None:
            state.done_error_lines.add(int(line))
        return
    rid = record.get("custom_id", record.get("id"))
    if rid is not None:
        state.done_ids.add(rid if state.typed_ids else str(rid))  # (an integer id stays one)


_OPEN_WRITERS: weakref.WeakSet[ResultWriter] = weakref.WeakSet()
"""Every ResultWriter not yet closed (`flush_open_writers`)."""


def flush_open_writers(timeout: float = 0.5) -> None:
    """Hand the records every open `ResultWriter` holds in its buffer to the OS, for a process about to end at once
    (`os._exit` on a second signal: no `close` runs). Best effort and bounded: a writer whose lock is not free within
    `timeout` (held by the interrupted code itself) is skipped, and its unsynced records may run again on resume."""
    for writer in list(_OPEN_WRITERS):
        writer.flush_now(timeout)


class ResultWriter:
    """Appends one JSON line per record; durable every `sync_every` records, and within `sync_seconds`
    of any write (a background thread syncs what is pending). Thread-safe; writer of the output file.
    `lazy`: the file is created at the first record (an errors file exists only when there are errors).
    Any failure to write or sync is raised as `OutputWriteError`, once. `num_written` counts the records
    written, `num_errors` those of them that record a failed line (a non-empty "error", as resume reads them);
    after a failure, both count what reached the file whole (`_count_what_reached_the_file`), as a resume will."""

    def __init__(self, output: Path, sync_every: int = 256, sync_seconds: float = 1.0, lazy: bool = False,
                 on_open: Callable[[Any, bytes], None] | None = None) -> None:
        self.path = output
        self._on_open = on_open
        """Called with the open file and the first record's bytes once a lazy writer has opened its file, before
        that record is written; what it raises is raised by `write`, and the file stays closed."""
        self._file = None
        self.sync_every = sync_every
        self.sync_seconds = sync_seconds
        self._unsynced = 0
        self.num_written = self.num_errors = 0
        self._start: int | None = None
        """Where this writer's records start in the file (it appends); None until it is open."""
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._failure: OutputWriteError | None = None
        self._reported = False
        if not lazy:
            self._open_locked()
        self._syncer = threading.Thread(target=self._sync_pending, name="batchllm-output-sync", daemon=True)
        self._syncer.start()
        _OPEN_WRITERS.add(self)

    def write(self, record: dict[str, Any]) -> None:
        data = encode_record(record)
        with self._lock:
            self._check()
            if self._file is None:
                self._open_locked()
                if self._on_open is not None:
                    try:
                        self._on_open(self._file, data)
                    except BaseException:
                        self._file.close()
                        self._file = None
                        raise
            self._guarded(self._file.write, data)
            self.num_written += 1
            self.num_errors += bool(record.get("error"))
            self._unsynced += 1
            if self._unsynced >= self.sync_every:
                self._sync_locked()

    def sync(self) -> None:
        with self._lock:
            self._check()
            self._sync_locked()

    def _open_locked(self) -> None:
        self._file = self._guarded(open, self.path, "ab")
        self._start = self._file.tell()

    def _guarded(self, call, *args):
        """`call(*args)`; an OSError becomes this file's OutputWriteError, remembered for every later call."""
        try:
            return call(*args)
        except OSError as e:
            self._failure = OutputWriteError(self.path, e)
            self._reported = True
            self._count_what_reached_the_file()
            raise self._failure from e

    def _count_what_reached_the_file(self) -> None:
        """After a failed write or sync: `num_written` and `num_errors` as the file holds this writer's records
        (whole lines: those still in the buffer never reached it, a torn last one a resume cuts), not as they were
        handed to the buffer (--stats counted 17 lines recorded of 9 on a full disk). Unchanged where the file
        cannot be read back, or is no regular file (/dev/full reads zeros for ever). Failures only: it parses each
        line this writer wrote (about 1 s per 100k)."""
        if self._start is None:
            return
        written = errors = 0
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return
            with open(self.path, "rb") as f:
                f.seek(self._start)
                for line in f:
                    if line.endswith(b"\n") and line.strip():
                        written += 1
                        errors += _records_an_error(line)
        except OSError:
            return
        self.num_written, self.num_errors = written, errors

    def _sync_locked(self) -> None:
        if self._file is not None and self._unsynced:
            self._guarded(self._file.flush)
            self._guarded(os.fsync, self._file.fileno())
        self._unsynced = 0

    def flush_now(self, timeout: float) -> None:
        """Flush the buffered records to the OS (no fsync: a process's exit keeps what the OS holds) where the lock
        frees within `timeout`; nothing after a failure, and no error raised (`flush_open_writers`)."""
        if not self._lock.acquire(timeout=timeout):
            return
        try:
            if self._file is not None and self._failure is None:
                self._file.flush()
        except (OSError, ValueError):  # a failed or closed file: what reached the OS stays
            pass
        finally:
            self._lock.release()

    def _sync_pending(self) -> None:
        while not self._closed.wait(self.sync_seconds):
            with self._lock:
                if self._unsynced and self._failure is None:
                    try:
                        self._sync_locked()
                    except OutputWriteError:  # reported by the next write, sync or close
                        self._reported = False

    def _check(self) -> None:
        if self._failure is not None:
            self._reported = True
            raise self._failure

    def close(self) -> None:
        """Sync and close. After a failure already raised to the caller, only closes (best effort):
        the caller is handling that failure, and a second report of it would hide the first."""
        self._closed.set()
        _OPEN_WRITERS.discard(self)
        self._syncer.join()
        try:
            if self._failure is None or not self._reported:
                self.sync()
        finally:
            file, self._file = self._file, None
            if file is not None:
                try:
                    file.close()
                except OSError as e:  # the buffer could not be flushed
                    if self._failure is None:  # else: that failure is already being reported
                        raise OutputWriteError(self.path, e) from e
                else:
                    if self._failure is not None:  # (closing flushed what the buffer held: the disk has room again)
                        self._count_what_reached_the_file()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _records_an_error(line: bytes) -> bool:
    """Whether a written record line records a failed line (a non-empty "error", as `ResultWriter` counts them)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and bool(record.get("error"))


def encode_record(record: dict[str, Any]) -> bytes:
    """One JSON line, UTF-8. A lone surrogate (ingest refuses them in lines, but an answer's JSON may escape one, as
    a tool call's arguments read back from "\\ud800"; a record must never fail to be written) becomes its JSON
    escape \\udXXX, so the line stays valid JSON that reads back to the same string."""
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"


def record_text(record: dict[str, Any]) -> str:
    """`encode_record`'s line as text, without its newline (what `run --ray` puts in its record column): every
    character UTF-8 can encode (no lone surrogate), so Arrow takes it and the shard line is `run`'s line."""
    return encode_record(record)[:-1].decode("utf-8")
