"""stats.py: the numbers eval.py reports, as pure functions (method §12): gIoU and cIoU, their 95%
intervals from a seeded bootstrap over queries, the results table per reasoning type, and the paired
difference of two evaluations of the same queries. No I/O: records in, dicts and strings out.

A record is one query's line of samples.jsonl: inter, union (pixels, ignore removed), reasoning_type,
gt_empty, pred_empty, failed (unparsable samples), resp_len (tokens per sample), id and query.
Tested by: python -m pytest tests/test_stats.py
"""
import numpy as np

REASONING = ('P/F', 'C/KI', 'C/R', 'C/MH')  # ReasonSeg-X's four types; "reasoning" = all four together
RESAMPLES, SEED, LEVEL = 2000, 0, 0.95     # bootstrap: resamples, seed, interval level


def iou_per_query(inter, union):
    """(S,) counts -> (S,) IoU; an empty prediction on an empty ground truth is 1 (method §12)."""
    inter, union = np.asarray(inter, float), np.asarray(union, float)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def _ciou(inter_sum, union_sum):
    return np.where(union_sum > 0, inter_sum / np.maximum(union_sum, 1), 1.0)


def iou_stats(pairs):
    """[(intersection, union)] per query -> gIoU = mean per-query IoU, cIoU = Σ inter / Σ union:
    summed counts, never averaged ratios (method §12). NaN gIoU for no query."""
    inter, union = np.array(pairs, float).reshape(-1, 2).T  # (S,), (S,)
    return dict(n=len(inter), gIoU=float(iou_per_query(inter, union).mean()) if len(inter) else float('nan'),
                cIoU=float(_ciou(inter.sum(), union.sum())))


def _resample_index(n, resamples, seed):
    """(resamples, n) query indices drawn with replacement, in chunks of rows to bound memory."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, 256):
        yield rng.integers(0, n, (min(256, resamples - start), n))


def _interval(values, level):
    lo, hi = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def bootstrap(pairs, resamples=RESAMPLES, seed=SEED, level=LEVEL):
    """iou_stats plus percentile intervals gIoU_ci, cIoU_ci: resample the queries with replacement;
    each resample's gIoU is the mean of its IoUs, its cIoU Σ inter / Σ union of its queries."""
    out = iou_stats(pairs)
    inter, union = np.array(pairs, float).reshape(-1, 2).T
    if len(inter) == 0:
        return {**out, 'gIoU_ci': None, 'cIoU_ci': None}
    iou, g, c = iou_per_query(inter, union), [], []
    for idx in _resample_index(len(inter), resamples, seed):  # (R, S)
        g.append(iou[idx].mean(1))
        c.append(_ciou(inter[idx].sum(1), union[idx].sum(1)))
    return {**out, 'gIoU_ci': _interval(np.concatenate(g), level), 'cIoU_ci': _interval(np.concatenate(c), level)}


def groups(recs):
    """-> [(name, records)]: 'all'; 'reasoning' (the four ReasonSeg-X types together) when any is
    there; then each type, the four in ReasonSeg-X order first, others (e.g. 'explicit') sorted."""
    types = {r['reasoning_type'] for r in recs if r['reasoning_type']}
    order = [t for t in REASONING if t in types] + sorted(types - set(REASONING))
    out = [('all', recs)]
    if types & set(REASONING):
        out.append(('reasoning', [r for r in recs if r['reasoning_type'] in REASONING]))
    return out + [(t, [r for r in recs if r['reasoning_type'] == t]) for t in order]


def pairs_of(recs):
    return [(r['inter'], r['union']) for r in recs]


def summarize(recs, resamples=RESAMPLES, seed=SEED, level=LEVEL):
    """Per-query records -> the results: gIoU, cIoU with intervals for 'all' (top level), the
    'reasoning' aggregate and each type (per_type). Failures and lengths count every sample."""
    boot = lambda rs: bootstrap(pairs_of(rs), resamples, seed, level)
    parts = groups(recs)
    empty = [r for r in recs if r['gt_empty']]
    n_resp = sum(len(r['resp_len']) for r in recs)
    return dict(**boot(recs), reasoning=next((boot(rs) for name, rs in parts if name == 'reasoning'), None),
                per_type={name: boot(rs) for name, rs in parts if name not in ('all', 'reasoning')},
                format_fail=sum(r['failed'] for r in recs) / max(n_resp, 1),
                no_object_acc=float(np.mean([r['pred_empty'] for r in empty])) if empty else None,
                n_no_object=len(empty), resp_len=sum(sum(r['resp_len']) for r in recs) / max(n_resp, 1),
                bootstrap=dict(resamples=resamples, seed=seed, level=level, over='queries'))


def align(a, b):
    """Two evals' records -> b reordered to a's order, matched by id; ValueError (one line) when the
    two did not run the same queries (ids, or the query text of an id)."""
    by_id = {r['id']: r for r in b}
    ids_a = [r['id'] for r in a]
    only_a, only_b = set(ids_a) - set(by_id), set(by_id) - set(ids_a)
    if only_a or only_b or len(ids_a) != len(set(ids_a)) or len(b) != len(by_id):
        raise ValueError(f'the two evals ran different queries ({len(a)} vs {len(b)}; {len(only_a)} only in the '
                         f'first, {len(only_b)} only in the second): a paired comparison needs the same ones')
    changed = [i for i, r in zip(ids_a, a) if r.get('query') != by_id[i].get('query')]
    if changed:
        raise ValueError(f'query {changed[0]!r} has another text in the two evals: not the same queries')
    return [by_id[i] for i in ids_a]


def paired(a, b, resamples=RESAMPLES, seed=SEED, level=LEVEL):
    """The difference a - b of two evals on the same queries, per group (groups() of a): the
    gIoU difference with its paired standard error (sd of the per-query differences / sqrt(n)) and
    interval (one bootstrap over queries, both evals resampled with the same indices), the cIoU
    difference with its bootstrap standard error and interval, and how many queries got better/worse."""
    b = align(a, b)
    pos = {id(r): k for k, r in enumerate(a)}
    ia, ua = np.array(pairs_of(a), float).reshape(-1, 2).T
    ib, ub = np.array(pairs_of(b), float).reshape(-1, 2).T
    da = iou_per_query(ia, ua) - iou_per_query(ib, ub)  # (S,) per-query differences
    out = {}
    for name, rs in groups(a):
        k = np.array([pos[id(r)] for r in rs], int)
        if not len(k):
            continue
        g, c = [], []
        for idx in _resample_index(len(k), resamples, seed):
            q = k[idx]  # (R, n) the same queries for both evals
            g.append(da[q].mean(1))
            c.append(_ciou(ia[q].sum(1), ua[q].sum(1)) - _ciou(ib[q].sum(1), ub[q].sum(1)))
        g, c = np.concatenate(g), np.concatenate(c)
        sa, sb = iou_stats(list(zip(ia[k], ua[k]))), iou_stats(list(zip(ib[k], ub[k])))
        out[name] = dict(n=len(k), gIoU_a=sa['gIoU'], gIoU_b=sb['gIoU'], gIoU_diff=float(da[k].mean()),
                         gIoU_se=float(da[k].std(ddof=1) / np.sqrt(len(k))) if len(k) > 1 else 0.0,
                         gIoU_ci=_interval(g, level), cIoU_a=sa['cIoU'], cIoU_b=sb['cIoU'],
                         cIoU_diff=sa['cIoU'] - sb['cIoU'], cIoU_se=float(c.std(ddof=1)), cIoU_ci=_interval(c, level),
                         better=int((da[k] > 0).sum()), worse=int((da[k] < 0).sum()))
    return out


# ------------------------------------------------------------------ the tables eval.py prints
def ci_text(v):
    return '' if v is None else f'[{100 * v[0]:.1f}, {100 * v[1]:.1f}]'


def rows(summary):
    """summarize()'s result -> [(name, stats)]: all, reasoning, then each type (the four indented)."""
    out = [('all', summary)] + ([('reasoning', summary['reasoning'])] if summary.get('reasoning') else [])
    return out + [(('  ' if t in REASONING else '') + t, st) for t, st in summary['per_type'].items()]


def table(named, first='type'):
    """[(name, bootstrap() stats)] -> one line each: n, gIoU and cIoU in % with their 95% intervals."""
    lines = [f"{first:<12}{'n':>6}{'gIoU':>7}  {'95% CI':<14}{'cIoU':>5}  95% CI"]
    for name, st in named:
        lines.append(f"{name:<12}{st['n']:>6}{100 * st['gIoU']:>7.1f}  {ci_text(st['gIoU_ci']):<14}"
                     f"{100 * st['cIoU']:>5.1f}  {ci_text(st['cIoU_ci'])}")
    return '\n'.join(lines)


def compare_table(result, name_a, name_b):
    """The paired comparison: per group both gIoU, the difference ± its paired SE, its 95% interval,
    queries better / worse, and the cIoU difference with its interval. Points of %."""
    pt = lambda v: f'{100 * v:+.1f}'
    ci = lambda v: f'[{pt(v[0])}, {pt(v[1])}]'
    lines = [f'paired difference: {name_a} minus {name_b}, on the same queries (points of %, ± paired SE, 95% CI)',
             f"{'type':<12}{'n':>6}{'gIoU a':>8}{'gIoU b':>8}  {'diff ± SE':<13}{'95% CI':<15}"
             f"{'better/worse':<14}{'cIoU diff':<11}95% CI"]
    for name, d in result.items():
        diff, bw = f"{pt(d['gIoU_diff'])} ± {100 * d['gIoU_se']:.1f}", f"{d['better']}/{d['worse']}"
        lines.append(f"{('  ' if name in REASONING else '') + name:<12}{d['n']:>6}{100 * d['gIoU_a']:>8.1f}"
                     f"{100 * d['gIoU_b']:>8.1f}  {diff:<13}{ci(d['gIoU_ci']):<15}{bw:<14}"
                     f"{pt(d['cIoU_diff']):<11}{ci(d['cIoU_ci'])}")
    return '\n'.join(lines)
