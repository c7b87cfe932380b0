"""The words: the findings, sentences derived from a report's numbers, never written by hand,
so a finding and its opposite are one branch apart. They go to report.json under "findings";
the measures that the numbers come from are in measures.py.
"""


def pct(value: float) -> str:
    """A share as every page and picture writes it: 0.1234 -> 12.3%."""
    return f"{value:.1%}"


def sentences(report: dict) -> dict:
    """One model's findings, keyed by the part of its page that shows them."""
    d, u = report["uncertainty"], report["calibration"]
    return {
        "mean_per_class": say_mean_per_class(
            report["mean_per_class_accuracy"],
            report["top1_accuracy"],
            report["test_images_per_class_equal"],
        ),
        "within_superclass": say_within(
            report["errors_within_superclass"], report["significance_level"]
        ),
        "taxonomy_features": say_recovery(report["taxonomy"]["features"], "penultimate features"),
        "taxonomy_confusion": say_recovery(report["taxonomy"]["confusion"], "confusions"),
        "calibration": say_calibration(u["mean_confidence"], u["accuracy"]),
        "uncertainty": say_uncertainty(
            d["mean_entropy_bits_correct"], d["mean_entropy_bits_wrong"]
        ),
        "duplicates": say_duplicates(report["dataset"]),
        "familiarity": say_familiarity(report["familiarity"]),
        "explanations": say_explanations(report["explanations"]["examples"]),
    }


def say_mean_per_class(mean: float, top1: float, equal_counts: bool) -> str:
    if equal_counts:
        return (
            f"Their mean, {pct(mean)}, is the top-1 accuracy ({pct(top1)}): every class has "
            "the same number of test images here, so each image weighs the same in both."
        )
    return (
        f"Their mean is {pct(mean)}, not the top-1 accuracy ({pct(top1)}): classes have "
        "different numbers of test images, and top-1 weighs each image, not each class, "
        "the same."
    )


def say_within(w: dict, level: float) -> str:
    if not w["errors"]:
        return "The model makes no errors on these images, so there is nothing to group."
    head = (
        f"Of the {w['errors']} errors, {pct(w['share'])} stay inside the true superclass, "
        f"where chance would put {pct(w['chance'])}"
    )
    if w["p_value"] >= level:
        return (
            f"{head}: {w['ratio_to_chance']:.1f} times chance, which a binomial test cannot "
            f"tell from chance (p = {w['p_value']:.2f}, level {level}). These errors show no "
            "sign of being between similar things."
        )
    if w["share"] < w["chance"]:
        return (
            f"{head}: fewer than chance (binomial test p < {level}). The model's errors "
            "avoid the true superclass."
        )
    most = (
        "Most errors are between classes of the same superclass."
        if w["share"] > 0.5
        else "Mistakes lean towards similar things, though most still cross superclasses."
    )
    return (
        f"{head}: {w['ratio_to_chance']:.1f} times what chance would give "
        f"(binomial test p < {level}). {most}"
    )


def say_recovery(r: dict, source: str) -> str:
    ari, share, chance = (
        r["adjusted_rand_index"],
        r["nearest_same_superclass_share"],
        r["nearest_same_superclass_chance"],
    )
    if ari >= 0.5:
        verdict = "largely recovers"
    elif ari >= 0.1:
        verdict = "partly recovers"
    else:
        verdict = "does not recover"
    if share > chance:
        neighbours = (
            f"{r['nearest_ratio_to_chance']:.1f} times the {pct(chance)} a random choice would give"
        )
    else:
        neighbours = f"no more than the {pct(chance)} a random choice would give"
    return (
        f"Grouped by their {source}, the classes cut into {r['clusters']} clusters give an "
        f"adjusted Rand index of {ari:.2f} against the {r['requested_clusters']} official "
        f"superclasses (1: the same grouping, 0: no better than random): the model {verdict} "
        f"the human taxonomy. Of each class's {r['nearest_k']} nearest classes, "
        f"{pct(share)} share its superclass, {neighbours}."
    )


def say_calibration(confidence: float, accuracy: float) -> str:
    if confidence > accuracy:
        return (
            f"Over-confident overall: mean confidence {pct(confidence)} against "
            f"{pct(accuracy)} accuracy."
        )
    if confidence < accuracy:
        return (
            f"Under-confident overall: mean confidence {pct(confidence)} against "
            f"{pct(accuracy)} accuracy."
        )
    return f"Mean confidence equals accuracy ({pct(accuracy)})."


def say_uncertainty(correct: float | None, wrong: float | None) -> str:
    if correct is None or wrong is None:
        return "The model is right on every image, or on none: no comparison to make."
    if wrong > correct:
        return (
            f"The model is less sure where it is wrong: mean entropy {wrong:.2f} bits on its "
            f"errors against {correct:.2f} bits where it is right, so its uncertainty is a "
            "usable warning."
        )
    return (
        f"The model is no less sure where it is wrong: mean entropy {wrong:.2f} bits on its "
        f"errors against {correct:.2f} bits where it is right, so its uncertainty does not "
        "warn of errors."
    )


def say_duplicates(d: dict) -> str:
    exact, near = d["test_with_exact_duplicate_in_train"], d["test_with_near_duplicate_in_train"]
    if exact + near == 0:
        found = "No test image has an exact or near twin in the training set."
    else:
        found = (
            f"{exact + near} test images have a twin in the training set: the model may have "
            "seen the answer, which inflates test scores."
        )
    return (
        f"{found} The former 64-bit difference-hash test (within {d['old_hash_max_bits']} "
        f"bits) would have flagged {d['old_hash_test_matches']}."
    )


def say_familiarity(f: dict) -> str:
    """How well familiarity tells known images from each other set, against the top
    probability; or that the file has no familiarity output."""
    if not f["available"]:
        return (
            "This model file has no familiarity output (it was exported before the export "
            "added one): export it again to see how it meets images unlike its training data."
        )
    known = f["known"]
    calibrated = (
        f"On the known classes' test images, {pct(known['share_below_level'])} score below "
        f"{f['level']}; a familiarity calibrated on images like these would put "
        f"{pct(f['level'])} there."
    )
    if not f["sets"]:
        return (
            f"{calibrated} No other images to compare with: the recipe held no class out; "
            "pass --unfamiliar PATH for a folder of other images."
        )
    parts = [calibrated]
    for s in f["sets"]:
        auroc = s["auroc"]
        if auroc >= 0.9:
            verdict = "separates them well from"
        elif auroc >= 0.7:
            verdict = "partly separates them from"
        else:
            verdict = "hardly separates them from"
        rival = s["top_probability_auroc"]
        versus = (
            f"better than the top probability alone (AUROC {rival:.3f})"
            if auroc > rival
            else f"no better than the top probability alone (AUROC {rival:.3f})"
        )
        parts.append(
            f"Against {s['name']} ({s['images']} images), familiarity {verdict} the "
            f"known images (AUROC {auroc:.3f}), {versus}; the threshold that accepts "
            f"{pct(f['threshold_recall'])} of the known images accepts "
            f"{pct(s['false_positive_rate'])} of these."
        )
    return " ".join(parts)


def say_explanations(examples: list[dict]) -> str:
    """Whether the same pixels speak for the true and the predicted class."""
    if not examples:
        return "The model confuses no pair of classes on these images: nothing to explain."
    measured = [e["map_correlation"] for e in examples if e["map_correlation"] is not None]
    if not measured:
        return "Every heat map is flat: covering any patch moves neither class's probability."
    same = sum(c > 0 for c in measured)
    if same * 2 > len(measured):
        return (
            f"In {same} of {len(measured)} examples the two maps correlate positively: the "
            "same regions support both classes, and the model weighs them towards the wrong "
            "one."
        )
    return (
        f"In {len(measured) - same} of {len(measured)} examples the two maps do not correlate "
        "positively: other regions support the wrong class than the true one."
    )


def capacity_sentences(p: dict) -> dict:
    """The findings of a pair of models: what the larger one gains over the smaller."""
    small, large = p["small"], p["large"]
    if p["classes_better"] > p["classes_worse"]:
        classes = (
            f"{large} is better than {small} on {p['classes_better']} classes and worse on "
            f"{p['classes_worse']} ({p['classes_equal']} equal)."
        )
    else:
        classes = (
            f"{large} is not better than {small} on most classes: better on "
            f"{p['classes_better']}, worse on {p['classes_worse']}, equal on "
            f"{p['classes_equal']}."
        )
    agreement = f"The two give the same answer on {pct(p['agreement'])} of the images."
    if p["large_errors_subset_of_small"]:
        subset = (
            f"Every error of {large} is also an error of {small}: the larger model only "
            "fixes mistakes, it adds none."
        )
    else:
        share = p["share_of_large_errors_also_small_errors"]
        subset = (
            f"The errors of {large} are not a subset of those of {small}: "
            f"{p['only_small_right']} images are right for {small} and wrong for {large}"
            + (f"; {pct(share)} of {large}'s errors are shared." if share is not None else ".")
        )
    if p["small_errors_subset_of_large"]:
        reverse = f"Every error of {small} is also an error of {large}."
    else:
        reverse = (
            f"The errors of {small} are not a subset of those of {large}: {large} fixes "
            f"{p['only_large_right']} of them."
        )
    both, independent = p["both_wrong"], p["both_wrong_if_independent"]
    if both > independent:
        joint = (
            f"Both are wrong on {both} images, more than the {independent:.1f} independent "
            "errors would give: the same images are hard for both."
        )
    else:
        joint = (
            f"Both are wrong on {both} images, no more than the {independent:.1f} independent "
            "errors would give."
        )
    return {
        "classes": classes,
        "agreement": agreement,
        "large_subset": subset,
        "small_subset": reverse,
        "joint": joint,
    }


# --- pictures --------------------------------------------------------------------------
