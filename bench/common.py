"""What every benchmark records beside its figures: the machine, the library versions, the command."""

import json
import os
import platform
import resource
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, '..', 'shared', 'data')
sys.path.insert(0, ROOT)


def environment(device=None):
    device = torch.device(device or 'cpu')
    return {'command': ' '.join(['python'] + sys.argv), 'device': str(device),
            'device_name': (torch.cuda.get_device_name(device) if device.type == 'cuda'
                            else platform.processor() or platform.machine()),
            'cpu_cores': len(os.sched_getaffinity(0)), 'torch': torch.__version__,
            'cuda': torch.version.cuda, 'threads': torch.get_num_threads()}


def write_json(path, result):
    if path:
        with open(path, 'w') as f:
            json.dump(result, f, indent=2)
        print(f'wrote {path}')


def peak_rss_gib():
    """This process's maximum resident set so far (an idle torch import is about 0.3 GiB of it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def synchronize(device):
    if torch.device(device).type == 'cuda':
        torch.cuda.synchronize()
