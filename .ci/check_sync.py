"""Fail if `nbdev_export` would change fraud_nb/ or if a notebook in nbs/ is not clean.

Works on a copy, so a developer's uncommitted work is never touched."""
import filecmp, shutil, subprocess, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parents[1]
bin_dir = Path(sys.executable).parent
problems = []
with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for name in ('settings.ini', 'setup.py', 'README.md'): shutil.copy(root/name, tmp/name)
    shutil.copytree(root/'nbs', tmp/'nbs')
    shutil.copytree(root/'fraud_nb', tmp/'fraud_nb')
    subprocess.run([bin_dir/'nbdev_export'], cwd=tmp, check=True)
    cmp = filecmp.dircmp(root/'fraud_nb', tmp/'fraud_nb', ignore=['__pycache__'])
    def walk(c, rel=''):
        for f in c.diff_files + c.left_only + c.right_only: problems.append(f'fraud_nb/{rel}{f} differs from what nbdev_export produces')
        for name, sub in c.subdirs.items(): walk(sub, f'{rel}{name}/')
    walk(cmp)
    subprocess.run([bin_dir/'nbdev_clean', '--fname', str(tmp/'nbs')], cwd=tmp, check=True)
    for nb in sorted((root/'nbs').glob('*.ipynb')):
        if nb.read_bytes() != (tmp/'nbs'/nb.name).read_bytes(): problems.append(f'nbs/{nb.name} is not clean: run nbdev_clean')
if problems:
    print('\n'.join(problems)); print('Notebooks and package are out of sync: run `make export` and commit both.')
    sys.exit(1)
print('nbs/ and fraud_nb/ are in sync, notebooks are clean.')
