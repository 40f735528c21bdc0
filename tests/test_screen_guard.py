"""bench/screen_guard.py's rules and tables, on synthetic probe losses and held-out figures. No model."""

from helpers import load_bench_script

screen = load_bench_script("screen_guard")


def probe(live, average):
    return {"live": list(live), "average": list(average)}


def test_the_paired_rule_needs_the_average_better_by_two_standard_errors():
    live = [1.0, 2.0, 3.0, 4.0]
    consistent = probe(live, [x - 0.01 for x in live])  # better on every crop: zero spread
    mixed = probe(live, [0.9, 2.1, 2.9, 4.08])  # better on the mean, by less than 2 SE
    assert screen.choose_average(consistent, paired=True) and screen.choose_average(consistent, paired=False)
    assert screen.choose_average(mixed, paired=False) and not screen.choose_average(mixed, paired=True)
    assert not screen.choose_average(probe(live, [x + 0.01 for x in live]), paired=False)


def test_rule_stats_count_costly_choices_against_the_held_out_photos():
    runs = [
        {"lmbda": 0.01, "seed": 0, "held_live": 1.000, "held_average": 1.010},  # average 1% worse
        {"lmbda": 0.01, "seed": 1, "held_live": 1.000, "held_average": 0.995},  # average 0.5% better
        {"lmbda": 0.01, "seed": 2, "held_live": 1.000, "held_average": 1.0005},  # 0.05% worse
    ]
    always = screen.rule_stats(runs, lambda r: True)
    assert always["kept"] == 3 and always["wrong"] == 2 and always["wrong_big"] == 1
    assert abs(always["worst"] - 0.01) < 1e-12 and abs(always["median"] - 0.0005) < 1e-12
    hindsight = screen.rule_stats(runs, lambda r: r["held_average"] <= r["held_live"])
    assert hindsight["wrong"] == 0 and hindsight["median"] == 0.0
    never = screen.rule_stats(runs, lambda r: False)
    assert never["median"] == 0.0 and never["wrong"] == 1 and never["worst"] > 0.005
