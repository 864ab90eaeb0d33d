"""The one place that talks: a logger writing to the console (through tqdm, so bars stay intact)
and to `<output_dir>/train.log`. Only rank 0 logs at INFO level.
"""
import logging
import sys

from tqdm import tqdm


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:
            self.handleError(record)


def setup_logging(log_file=None, is_main=True):
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    console = _TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file and is_main:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(fh)
    logging.captureWarnings(True)
    return logging.getLogger("train")
