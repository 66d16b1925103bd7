"""How big are the export cells and the modules? The figures of the chapter style.

Prints, over the numbered chapters nbs/[0-9]*.ipynb, the median and the 90th percentile of the line
counts of export cells (`#| export` / `#| exporti`), the largest cells, and the line count of every
exported module in fraud_nb/. The targets: median <= 12 lines, 90th percentile <= 35, no cell over
~30 lines that could be split, no module over ~450 lines.

    python benchmarks/cell_sizes.py            # the figures
    python benchmarks/cell_sizes.py --top 20   # and the 20 largest export cells
"""
from __future__ import annotations
import argparse, json, re, statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPORT = re.compile(r'^#\|\s*export(i)?\b', re.M)


def export_cells(nb: Path) -> list[int]:
    "Line counts of the export cells of one notebook (directive lines and blank lines not counted)."
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    sizes = []
    for c in cells:
        src = ''.join(c['source']) if isinstance(c['source'], list) else c['source']
        if c['cell_type'] != 'code' or not EXPORT.search(src): continue
        sizes.append(sum(1 for l in src.splitlines() if l.strip() and not l.lstrip().startswith('#|')))
    return sizes


def percentile(xs: list[int], q: float) -> float:
    "The q-th percentile (0-100) by linear interpolation, as numpy's default."
    xs = sorted(xs)
    if not xs: return float('nan')
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description='export-cell and module sizes of fraud_nb')
    ap.add_argument('--top', type=int, default=10, help='show this many largest export cells')
    a = ap.parse_args(argv)
    per_nb = {nb.name: export_cells(nb) for nb in sorted((ROOT/'nbs').glob('[0-9]*.ipynb'))}
    sizes = [n for v in per_nb.values() for n in v]
    print(f'export cells: {len(sizes)} in {len(per_nb)} chapters; median {statistics.median(sizes):.0f} lines '
          f'(target <= 12), 90th percentile {percentile(sizes, 90):.0f} (target <= 35), largest {max(sizes)}')
    print('\nper chapter: cells, median, 90th percentile, largest')
    for name, v in per_nb.items():
        if v: print(f'  {name:<32} {len(v):>4} {statistics.median(v):>6.0f} {percentile(v, 90):>6.0f} {max(v):>6}')
    big = sorted(((n, name) for name, v in per_nb.items() for n in v), reverse=True)[:a.top]
    print(f'\nlargest export cells: ' + ', '.join(f'{name} {n}' for n, name in big))
    print('\nmodules (lines; target <= ~450):')
    for py in sorted((ROOT/'fraud_nb').glob('*.py')):
        if py.name.startswith('_'): continue
        n = len(py.read_text(encoding='utf-8').splitlines())
        print(f'  {py.name:<24} {n:>5}{"  OVER" if n > 450 else ""}')
    return 0


if __name__ == '__main__': raise SystemExit(main())
