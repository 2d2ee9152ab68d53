"""What a run tells its user: a progress bar, one line per epoch, TensorBoard scalars, summary.json.

Only process 0 reports. TensorBoard scalars use WZMIAOMIAO's names (train_loss, train_acc, val_loss, val_acc,
learning_rate), indexed by epoch, plus images_per_sec (absent for an epoch too short to time) and unreadable_images
(files that would not decode, skipped) and data_wait_ms (the mean time a step waited for its batch: ~0 when the
input pipeline keeps up).
"""
import json
import os
import sys

from converters.formats import training_ckpt as fmt
from converters.formats.durable import atomic_output

TB_SCALARS = ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate', 'images_per_sec', 'unreadable_images',
              'data_wait_ms')
# written when the run has them: top-5, and the weight EMA's figures (--model-ema)
OPTIONAL_SCALARS = ('val_top5', 'val_loss_ema', 'val_acc_ema', 'val_top5_ema')
METRICS_JSONL = 'metrics.jsonl'


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
        with open(os.path.join(workdir, fmt.SUMMARY)) as f:
            return list(json.load(f).get('history', []))
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
        self.summary_path = os.path.join(workdir, fmt.SUMMARY)
        self.history = []
        self.tb = None
        if main:
            self.tb = summary_writer(workdir)
            try:
                with open(self.summary_path) as f:
                    self.history = [h for h in json.load(f).get('history', []) if h['epoch'] <= resume_epoch]
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
        with atomic_output(self.summary_path, force=True) as tmp, open(tmp, 'w') as f:
            json.dump(dict(record, history=self.history), f, indent=2)
        print(f"epoch {record['epoch']}/{record['epochs']}  step {record['step']}  "
                 f"train_loss {record['train_loss']:.4f}  train_acc {record['train_acc']:.4f}  "
                 f"val_loss {record['val_loss']:.4f}  val_acc {record['val_acc']:.4f}  "
                 f"lr {record['learning_rate']:.2e}  "
                 + (f"data wait {record['data_wait_ms']:.1f} ms/step  " if record.get('data_wait_ms') is not None
                    else '') + speed_text(record['images_per_sec']), flush=True)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
        self.f = None
        if main and every:
            path = os.path.join(workdir, METRICS_JSONL)
            kept = []
            try:
                with open(path) as f:
                    for line in f:
                        try:
                            if json.loads(line)['step'] <= resume_step:
                                kept.append(line)
                        except (ValueError, KeyError, TypeError):
                            pass
            except OSError:
                pass
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
        for k, v in rec.items():
            if k != 'step' and v is not None:
                self.tb.add_scalar(f'step/{k}', v, n)
        self.t_last, self.wait, self.steps = now, 0.0, 0

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None
