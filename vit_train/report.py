"""What a run tells its user: a progress bar, one line per epoch, TensorBoard scalars, summary.json.

Only process 0 reports. TensorBoard scalars use WZMIAOMIAO's names (train_loss, train_acc, val_loss, val_acc,
learning_rate), indexed by epoch, plus images_per_sec (absent for an epoch too short to time) and unreadable_images
(files that would not decode, skipped) and data_wait_ms (the mean time a step waited for its batch: ~0 when the
input pipeline keeps up).

The workdir may be a URL (gs://bucket/run): summary.json is then uploaded whole each epoch, metrics.jsonl
whole at most every URL_UPLOAD_S seconds and at the end (an object store cannot append), and the TensorBoard
events are written by tensorboardX into a local folder and copied to the workdir after each epoch's flush
and at the end (tensorboardX writes only local files, s3:// with boto3 and gs:// with google-cloud-storage,
and its gs:// writer re-uploads the whole file at each flush anyway).
"""
import io
import json
import os
import shutil
import sys
import tempfile
import time

from converters.formats import paths, training_ckpt as fmt

TB_SCALARS = ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate', 'images_per_sec', 'unreadable_images',
              'data_wait_ms')
# written when the run has them: top-5, and the weight EMA's figures (--model-ema)
OPTIONAL_SCALARS = ('val_top5', 'val_loss_ema', 'val_acc_ema', 'val_top5_ema')
METRICS_JSONL = 'metrics.jsonl'
URL_UPLOAD_S = 60.0   # a URL workdir's metrics.jsonl is uploaded at most this often (and at the end)


def printer(main: bool, stream=None):
    """print() to `stream` (stdout by default) on process 0, nothing elsewhere."""
    def say(msg: str) -> None:
        if main:
            print(msg, file=stream or sys.stdout, flush=True)
    return say


def place(step: int, steps_per_epoch: int, epochs: int) -> str:
    """Where step `step` lies, counted as the epoch lines count (the number of updates done: epoch 1 ends at
    step `steps_per_epoch`): 'epoch 2 of 2, step 10 of 22 in it', 'the end of epoch 1 of 2', 'before epoch 1'."""
    if step <= 0:
        return 'before epoch 1'
    epoch, k = (step - 1) // steps_per_epoch + 1, (step - 1) % steps_per_epoch + 1
    if k == steps_per_epoch:
        return f'the end of epoch {epoch} of {epochs}'
    return f'epoch {epoch} of {epochs}, step {k} of {steps_per_epoch} in it'


def where(step: int, steps_per_epoch: int, epochs: int) -> str:
    """'step 32 of 44 (epoch 2 of 2, step 10 of 22 in it)'."""
    return f'step {step} of {steps_per_epoch * epochs} ({place(step, steps_per_epoch, epochs)})'


def resumed(step: int, steps_per_epoch: int, epochs: int) -> str:
    """The line a resumed run starts with: where its checkpoint was, and which step comes next."""
    nxt = f'step {step + 1}' + (f', the first of epoch {step // steps_per_epoch + 1}' if step % steps_per_epoch == 0
                                else '')
    return f'resumed from the checkpoint of {where(step, steps_per_epoch, epochs)}; continuing with {nxt}'


def speed_text(images_per_sec) -> str:
    """'1234 img/s', or what an epoch too short to time has instead of a figure."""
    if images_per_sec is None:
        return 'img/s n/a (too few steps after the first, which compiles, to time)'
    return f'{images_per_sec:.0f} img/s'


def read_history(workdir: str) -> list:
    """summary.json's `history` in `workdir` ([] when there is none to read)."""
    try:
        return list(json.loads(paths.read_text(paths.join(workdir, fmt.SUMMARY))).get('history', []))
    except (OSError, ValueError, AttributeError):
        return []


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def summary_writer(logdir: str):
    """tensorboardX's SummaryWriter, imported without torch when torch is not loaded yet: tensorboardX imports
    it only to accept torch tensors (we log floats), and it costs seconds of start-up and a second thread
    pool beside XLA's."""
    if 'torch' not in sys.modules and 'tensorboardX' not in sys.modules:
        sys.modules['torch'] = None  # makes `import torch` raise ImportError, which tensorboardX tolerates
        try:
            import tensorboardX  # noqa: F401
        finally:
            del sys.modules['torch']
    from tensorboardX import SummaryWriter
    return SummaryWriter(logdir)


class Reporter:
    def __init__(self, workdir: str, main: bool, resume_epoch: int = 0):
        self.workdir, self.main = workdir, main
        self.summary_path = paths.join(workdir, fmt.SUMMARY)
        self.history = []
        self.tb, self.tb_local = None, None
        if main:
            if paths.is_url(workdir):   # events written here, copied to the workdir (module docstring)
                self.tb_local = tempfile.mkdtemp(prefix='vit-flax-events-')
            self.tb = summary_writer(self.tb_local or workdir)
            try:
                self.history = [h for h in json.loads(paths.read_text(self.summary_path)).get('history', [])
                                if h['epoch'] <= resume_epoch]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                self.history = []

    def bar(self, total: int, desc: str, initial: int = 0):
        if not (self.main and sys.stderr.isatty()):
            return _NoBar()
        from tqdm import tqdm
        return tqdm(total=total, initial=initial, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def epoch(self, record: dict) -> None:
        """Print the epoch's line, write its scalars, rewrite summary.json (atomically)."""
        if not self.main:
            return
        self.history.append({k: record.get(k) for k in ('epoch', 'step', 'train_loss', 'train_acc', 'val_loss',
                                                     'val_acc', 'learning_rate', 'images_per_sec', 'unreadable_images',
                                                     'data_wait_ms')})
        self.history[-1].update({k: record[k] for k in OPTIONAL_SCALARS if k in record})
        for k in TB_SCALARS + OPTIONAL_SCALARS:
            if record.get(k) is not None:  # images_per_sec of an epoch too short to time
                self.tb.add_scalar(k, record[k], record['epoch'])
        self.tb.flush()
        self._copy_events()
        paths.write_text(self.summary_path, json.dumps(dict(record, history=self.history), indent=2))
        print(f"epoch {record['epoch']}/{record['epochs']}  step {record['step']}  "
                 f"train_loss {record['train_loss']:.4f}  train_acc {record['train_acc']:.4f}  "
                 f"val_loss {record['val_loss']:.4f}  val_acc {record['val_acc']:.4f}  "
                 f"lr {record['learning_rate']:.2e}  "
                 + (f"data wait {record['data_wait_ms']:.1f} ms/step  " if record.get('data_wait_ms') is not None
                    else '') + speed_text(record['images_per_sec']), flush=True)

    def _copy_events(self) -> None:
        """A URL workdir: the local event files (grown since the last copy) uploaded whole."""
        if self.tb_local:
            for name in sorted(os.listdir(self.tb_local)):
                with open(os.path.join(self.tb_local, name), 'rb') as f:
                    paths.write_bytes(paths.join(self.workdir, name), f.read())

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
            if self.tb_local:
                self._copy_events()
                shutil.rmtree(self.tb_local, ignore_errors=True)


class StepLog:
    """Per-step figures every `every` updates (0: none), to TensorBoard (tags step/loss, step/lr,
    step/grad_norm, step/data_wait, step/images_per_sec, indexed by the update number) and to
    WORKDIR/metrics.jsonl, one JSON object a line: {"step", "loss", "lr", "grad_norm", "data_wait",
    "images_per_sec"}. `loss` and `grad_norm` are those of the logged update (the gradient norm before
    clipping); `data_wait` is the fraction of the wall time since the previous line the loop spent waiting for
    the input pipeline; `images_per_sec` the updates' images over that time. A resumed run first drops the
    lines after its checkpoint's step, so the file reads as one run."""

    def __init__(self, workdir: str, main: bool, every: int, batch: int, lr_at, tb, resume_step: int = 0):
        self.every, self.batch, self.lr_at, self.tb = every, batch, lr_at, tb
        self.f, self.url, self.uploaded = None, None, time.perf_counter()
        if main and every:
            path = paths.join(workdir, METRICS_JSONL)
            kept = []
            try:
                for line in io.StringIO(paths.read_text(path)):
                    try:
                        if json.loads(line)['step'] <= resume_step:
                            kept.append(line)
                    except (ValueError, KeyError, TypeError):
                        pass
            except OSError:
                pass
            if paths.is_url(path):   # kept here, uploaded whole (module docstring)
                self.f, self.url = io.StringIO(), path
            else:
                self.f = open(path, 'w')
            self.f.writelines(kept)
        self.t_last, self.wait, self.steps = None, 0.0, 0

    def waited(self, seconds: float) -> None:
        import time
        if self.t_last is None:
            self.t_last = time.perf_counter() - seconds
        self.wait += seconds

    def on_metrics(self, step_no: int, m: dict) -> None:
        """Metrics of update `step_no` (0-based) as the loop fetched them."""
        import time
        self.steps += 1
        n = step_no + 1
        if self.f is None or n % self.every:
            return
        now = time.perf_counter()
        dt = now - self.t_last if self.t_last is not None else 0.0
        rec = dict(step=n, loss=m['loss'], lr=self.lr_at(step_no), grad_norm=m.get('grad_norm'),
                   data_wait=self.wait / dt if dt > 0 else None,
                   images_per_sec=self.steps * self.batch / dt if dt > 0 else None)
        self.f.write(json.dumps(rec) + '\n')
        self.f.flush()
        if self.url and now - self.uploaded >= URL_UPLOAD_S:
            paths.write_text(self.url, self.f.getvalue())
            self.uploaded = now
        for k, v in rec.items():
            if k != 'step' and v is not None:
                self.tb.add_scalar(f'step/{k}', v, n)
        self.t_last, self.wait, self.steps = now, 0.0, 0

    def close(self) -> None:
        if self.f is not None:
            if self.url:
                paths.write_text(self.url, self.f.getvalue())
            self.f.close()
            self.f = None
