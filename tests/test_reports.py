"What `reports/` shows a reader: figures that match the files beside them, paths relative to the repository, metrics traceable to a commit."
import json, os, re, subprocess, sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REPORTS = REPO / 'reports'
TEXT_SUFFIXES = {'.ipynb', '.py', '.md', '.csv', '.json', '.txt'}
ABSOLUTE_HOME_OR_WORK = re.compile(r'(?<![\w.~-])/(?:work|home|root|Users)/')

def test_reports_readme_figures_are_what_the_files_give():
    "Every generated figure of reports/README.md equals what `report_summary` computes from the CSV/JSON files beside it."
    from cnnmodules.experiments import SUMMARY_MARK, fill_summary, report_summary
    readme = (REPORTS / 'README.md').read_text()
    keys = {m['key'] for m in SUMMARY_MARK.finditer(readme)}
    assert {'rq1.decompose_vs_predict', 'rq1.fused_vs_predict', 'rq1.literal_vs_batched', 'rq1.compose_vs_predict',
            'models.cifar10_resnet32_e4.epoch_min'} <= keys, f'the README lost generated figures; it has {sorted(keys)}'
    assert fill_summary(readme, report_summary(REPORTS)) == readme, \
        "reports/README.md's figures differ from the files: run update_reports_readme('reports') and read the diff"

def test_reports_hold_no_absolute_paths_of_a_machine():
    "No file in reports/ (executed notebooks included: parameters, outputs, metadata) names a home or work folder."
    hits = []
    for f in sorted(REPORTS.rglob('*')):
        if f.is_file() and f.suffix in TEXT_SUFFIXES:
            for i, line in enumerate(f.read_text(errors='replace').splitlines(), 1):
                if ABSOLUTE_HOME_OR_WORK.search(line): hits.append(f'{f.relative_to(REPO)}:{i}: {line.strip()[:120]}')
    assert not hits, 'absolute paths in reports/:\n' + '\n'.join(hits[:20])

def test_write_metrics_records_the_commit(tmp_path):
    "metrics.json names the code that produced it: version, git commit of this clone, and whether tracked files were modified."
    import cnnmodules
    from cnnmodules.experiments import write_metrics, repo_root
    m = json.loads(write_metrics({'top1': 0.5}, tmp_path).read_text())
    assert m['top1'] == 0.5 and m['code']['version'] == cnnmodules.__version__
    if repo_root() is None: pytest.skip('the package is not imported from a git clone')
    head = subprocess.run(['git', '-C', str(REPO), 'rev-parse', 'HEAD'], capture_output=True, text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(['git', '-C', str(REPO), 'status', '--porcelain', '--untracked-files=no'],
                                capture_output=True, text=True, check=True).stdout.strip())
    assert m['code']['commit'] == head and m['code']['dirty'] is dirty

SHARED = Path(os.environ.get('CNNMODULES_DATA') or REPO.parent / 'shared' / 'data')

@pytest.mark.skipif(not (SHARED / 'cifar10-jpeg.zip').exists(), reason=f'no offline CIFAR-10 copy at {SHARED}')
def test_cli_run_writes_paths_relative_to_the_repository(tmp_path):
    "`cnnmodules run train_resnet` records no absolute path of the repository (not in papermill's metadata, parameters or outputs), and writes the model, its record and the checkpoint."
    out = tmp_path / 'train.ipynb'
    # the run's cache is the session's (conftest: a private folder removed at the end), so CIFAR-10 is decoded once per run
    env = {**os.environ, 'CNNMODULES_DATA': str(SHARED),
           'PYTHONPATH': os.pathsep.join([str(REPO)] + [p for p in [os.environ.get('PYTHONPATH')] if p])}
    r = subprocess.run([sys.executable, '-c', 'import sys; from cnnmodules.cli import main; sys.exit(main())', 'run', 'train_resnet',
                        '-p', 'depth', '8', '-p', 'train_per_class', '5', '-p', 'epochs', '1', '-p', 'out_dir', str(tmp_path / 'models'),
                        '-p', 'checkpoint_dir', str(tmp_path / 'ckpt'), '--out', str(out)],
                       capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    text = out.read_text()
    assert str(REPO) not in text
    nb = json.loads(text)
    assert nb['metadata']['papermill']['input_path'] == 'nbs/experiments/train_resnet.ipynb'
    assert nb['metadata']['papermill']['output_path'] == os.path.relpath(out, REPO)
    # and the run made what train_resnet.ipynb promises: the model, its record (at the run's scale) and the checkpoint
    rec = json.loads((tmp_path / 'models' / 'cifar10_resnet8_ci.json').read_text())
    assert rec['epochs'] == 1 and rec['train_images'] == 50 and 0 <= rec['test_top1'] <= 1
    assert (tmp_path / 'models' / 'cifar10_resnet8_ci.keras').exists() and (tmp_path / 'ckpt' / 'best.keras').exists()

def _literal(s):
    import ast
    try: return ast.literal_eval(s)
    except (ValueError, SyntaxError): return s

def test_executed_introductions_give_the_commands_that_ran():
    "Where an executed notebook's introduction gives the command that produced it, each `-p NAME VALUE` is what papermill injected."
    bad, checked = [], 0
    for f in sorted(REPORTS.rglob('*.ipynb')):
        nb = json.loads(f.read_text())
        params = nb['metadata'].get('papermill', {}).get('parameters')
        if params is None: continue
        intro = next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'markdown')
        for cmd in intro.split('papermill ')[1:]:
            src_out = cmd.split()[:2]
            if len(src_out) < 2 or Path(src_out[1].strip('`')).name != f.name: continue   # an example for another run
            for k, v in re.findall(r'-p (\w+) (\S+)', cmd):
                if k not in params: continue
                checked += 1
                if _literal(v.rstrip('`.,;)')) != params[k]: bad.append(f'{f.relative_to(REPO)}: -p {k} {v} but it ran with {params[k]!r}')
    assert checked, 'no executed introduction gives a command'
    assert not bad, '\n'.join(bad)
