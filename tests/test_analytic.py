"""The analytic classifier: exact streaming statistics, order invariance, GCV, persistence."""

import numpy as np
import pytest
import torch

from continual_transformer.model.closed_form import GCV_GRID, AnalyticClassifier


def _data(seed=0, n=240, d=12, classes=("a", "b", "c", "d")):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(classes), d)) * 2
    y = [classes[i % len(classes)] for i in range(n)]
    X = np.stack([centres[classes.index(c)] + rng.normal(size=d) for c in y])
    return torch.tensor(X, dtype=torch.float32), y


def _batch_ridge(clf: AnalyticClassifier, X, y):
    """The ridge solution computed directly from all examples at once."""
    phi = clf.features(X).numpy()
    classes = clf.classes_
    Y = np.array([[1.0 if c == k else 0.0 for k in classes] for c in y])
    mu_x, mu_y = phi.mean(0), Y.mean(0)
    Xc, Yc = phi - mu_x, Y - mu_y
    G = Xc.T @ Xc
    lam = clf.alpha_ * np.linalg.eigvalsh(G).clip(min=0).mean()
    coef = np.linalg.solve(G + lam * np.eye(len(G)), Xc.T @ Yc)
    return coef, mu_y - mu_x @ coef


@pytest.mark.parametrize("n_features", [0, 64])
def test_streaming_ridge_equals_batch_solution(n_features):
    X, y = _data()
    clf = AnalyticClassifier(in_dim=X.shape[1], n_features=n_features, solver="ridge", seed=1)
    for start in range(0, len(y), 50):  # arbitrary chunks, classes arriving over time
        clf.partial_fit(X[start:start + 50], y[start:start + 50])
    coef, intercept = clf.solution()
    batch_coef, batch_intercept = _batch_ridge(clf, X, y)
    np.testing.assert_allclose(coef.numpy(), batch_coef, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(intercept.numpy(), batch_intercept, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("solver", ["ridge", "lda"])
def test_task_order_does_not_change_the_model(solver):
    X, y = _data(n=300, classes=("a", "b", "c", "d", "e", "f"))
    tasks = {"t1": ("a", "b"), "t2": ("c", "d"), "t3": ("e", "f")}
    rows = {t: [i for i, c in enumerate(y) if c in labels] for t, labels in tasks.items()}
    models = []
    for order in (["t1", "t2", "t3"], ["t3", "t1", "t2"], ["t2", "t3", "t1"]):
        clf = AnalyticClassifier(in_dim=X.shape[1], n_features=32, solver=solver, seed=0)
        for t in order:
            clf.partial_fit(X[rows[t]], [y[i] for i in rows[t]])
        models.append(clf)
    reference = models[0]
    for other in models[1:]:
        assert other.alpha_ is None or other.solution() is not None
        permutation = [other.classes_.index(c) for c in reference.classes_]
        coef, intercept = other.solution()
        np.testing.assert_allclose(coef[:, permutation].numpy(), reference.solution()[0].numpy(),
                                   rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(intercept[permutation].numpy(), reference.solution()[1].numpy(),
                                   rtol=1e-8, atol=1e-10)
        assert other.predict(X) == reference.predict(X)


@pytest.mark.parametrize("solver", ["ridge", "lda"])  # lda: tridiagonal path, no eigenvectors
@pytest.mark.parametrize("n, features", [(120, 20), (30, 64)])  # fewer examples than features
def test_gcv_picks_the_same_penalty_as_explicit_hat_matrix(solver, n, features):
    X, y = _data(n=n, d=6)
    clf = AnalyticClassifier(in_dim=6, n_features=features, solver=solver, seed=3).partial_fit(X, y)
    clf.solution()
    phi = clf.features(X).numpy()
    Y = np.array([[1.0 if c == k else 0.0 for k in clf.classes_] for c in y])
    Xc, Yc = phi - phi.mean(0), Y - Y.mean(0)
    G = Xc.T @ Xc
    scale = np.linalg.eigvalsh(G).clip(min=0).mean()
    scores = []
    for alpha in GCV_GRID:
        H = Xc @ np.linalg.solve(G + alpha * scale * np.eye(len(G)), Xc.T)
        rss = ((Yc - H @ Yc) ** 2).sum()
        dof = np.trace(H) + 1
        scores.append((rss / n) / (1 - dof / n) ** 2 if dof < n else np.inf)
    assert clf.alpha_ == GCV_GRID[int(np.argmin(scores))]
    ridge = AnalyticClassifier(in_dim=6, n_features=features, solver="ridge", seed=3).partial_fit(X, y)
    lda = AnalyticClassifier(in_dim=6, n_features=features, solver="lda", seed=3).partial_fit(X, y)
    gram = lda.gram_
    # the penalty alone (LDA's) against the eigen-decomposition's criterion (ridge's)
    assert lda._gcv_penalty(gram) == ridge._gcv()[0] == clf.alpha_


def test_state_size_grows_with_classes_not_examples():
    X, y = _data(n=400)
    small = AnalyticClassifier(in_dim=X.shape[1], n_features=16).partial_fit(X[:40], y[:40])
    large = AnalyticClassifier(in_dim=X.shape[1], n_features=16).partial_fit(X, y)
    assert small.gram_.shape == large.gram_.shape == (16, 16)
    assert small.sums_.shape == large.sums_.shape == (4, 16)
    assert large.n_examples == 400
    more = AnalyticClassifier(in_dim=X.shape[1], n_features=16).partial_fit(X, [c + "x" if i % 8 == 0 else c for i, c in enumerate(y)])
    assert more.sums_.shape[0] > large.sums_.shape[0]


def test_state_round_trip_reproduces_predictions():
    X, y = _data()
    clf = AnalyticClassifier(in_dim=X.shape[1], n_features=24, seed=5).partial_fit(X, y)
    copy = AnalyticClassifier(in_dim=X.shape[1], n_features=24, seed=5)
    copy.load_shared_state(clf.shared_state())
    copy.load_class_state(clf.classes_, clf.class_state(clf.classes_))
    assert torch.equal(copy.decision_function(X), clf.decision_function(X))


def test_remove_classes_and_validation():
    X, y = _data()
    clf = AnalyticClassifier(in_dim=X.shape[1], n_features=8).partial_fit(X, y)
    clf.remove_classes(["a"])
    assert clf.classes_ == ["b", "c", "d"]
    assert "a" not in set(clf.predict(X))
    with pytest.raises(KeyError, match="unknown classes \\['zz'\\]"):
        clf.remove_classes(["zz"])
    with pytest.raises(ValueError, match="solver must be one of \\['ridge', 'lda'\\], got 'svm'"):
        AnalyticClassifier(in_dim=3, solver="svm")
    with pytest.raises(ValueError, match="features have dimension 5, expected 12"):
        clf.partial_fit(torch.zeros(2, 5), ["a", "b"])


def test_lda_shrinkage_is_the_gcv_choice_unless_given():
    X, y = _data(n=160, d=8)
    ridge = AnalyticClassifier(in_dim=8, n_features=16, solver="ridge").partial_fit(X, y)
    lda = AnalyticClassifier(in_dim=8, n_features=16, solver="lda").partial_fit(X, y)
    fixed = AnalyticClassifier(in_dim=8, n_features=16, solver="lda", shrinkage=0.5).partial_fit(X, y)
    ridge.solution(), lda.solution(), fixed.solution()
    assert lda.alpha_ == ridge.alpha_
    assert fixed.alpha_ == 0.5
    accuracy = np.mean([p == t for p, t in zip(lda.predict(X), y)])
    assert accuracy > 0.9



def _gaussian_classes(train_counts, n_test_per_class, seed=0, d=10, spread=0.3):
    """Train and held-out rows of classes with close means and correlated noise: many rows are
    ambiguous, so the covariance and its shrinkage decide their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(train_counts), d)) * spread
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)

    def draw(counts):
        labels = [f"c{k}" for k, count in enumerate(counts) for _ in range(count)]
        X = np.stack([centres[int(c[1:])] + rng.normal(size=d) @ mixing for c in labels])
        order = rng.permutation(len(labels))
        return X[order], [labels[i] for i in order]

    return (*draw(train_counts), *draw([n_test_per_class] * len(train_counts)))


def _streamed_lda(X, y, shrinkage, chunk=70):
    clf = AnalyticClassifier(in_dim=X.shape[1], n_features=0, solver="lda", shrinkage=shrinkage)
    for start in range(0, len(y), chunk):  # classes arrive over several calls
        clf.partial_fit(torch.tensor(X[start:start + chunk]), y[start:start + chunk])
    return clf


def _unit_rows(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)  # what RandomFeatures(n_features=0) does


@pytest.mark.parametrize("shrinkage", [0.3, 2.0, None])
def test_streaming_lda_equals_sklearn_shrunk_lda(shrinkage):
    """The "lda" solver is scikit-learn's shrunk LDA with shrinkage s = a / (1 + a).

    Ours solves (S + a tr(S)/D I) w_k = m_k, S the pooled within-class scatter W / (n - K), and
    scores x.w_k - m_k.w_k / 2 (equal priors). sklearn's lsqr solver uses
    sum_k pi_k [(1 - s) C_k + s tr(C_k)/D I] with C_k the biased class covariance; for
    pi_k = n_k / n that is (1 - s) W/n + s tr(W/n)/D I, which is our matrix divided by
    c = n (1 + a) / (n - K) when s = a / (1 + a). So sklearn's scores are c * ours + log pi_k.
    With balanced classes the class proportions are uniform, and sklearn with
    priors=uniform predicts exactly our labels, its scores being c * ours - log K.
    `a` is `shrinkage`, or the GCV choice (alpha_) when it is None.
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    K = 5
    X_train, y_train, X_test, y_test = _gaussian_classes([60] * K, 30)
    ours = _streamed_lda(X_train, y_train, shrinkage)
    ours.solution()
    a, n = ours.alpha_, len(y_train)  # a == shrinkage when given
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=a / (1 + a),
                                           priors=np.full(K, 1.0 / K))
    reference.fit(_unit_rows(X_train), y_train)

    predicted = ours.predict(torch.tensor(X_test))
    assert predicted == list(reference.predict(_unit_rows(X_test)))
    permutation = [ours.classes_.index(c) for c in reference.classes_]  # sklearn sorts classes
    scores = ours.decision_function(torch.tensor(X_test)).numpy()[:, permutation]
    np.testing.assert_allclose(n * (1 + a) / (n - K) * scores - np.log(K),
                               reference.decision_function(_unit_rows(X_test)),
                               rtol=1e-7, atol=1e-7)
    accuracy = np.mean([p == t for p, t in zip(predicted, y_test)])
    assert 1 / K + 0.15 < accuracy < 0.95  # learned, yet many held-out rows are ambiguous


def test_streaming_lda_with_unequal_classes_is_sklearn_lda_without_its_log_priors():
    """With unequal classes our pooled covariance is still sklearn's with its default priors
    (the class proportions pi_k), up to c = n (1 + a) / (n - K) at s = a / (1 + a); our rule has
    equal priors, so c * ours = sklearn's scores - log pi_k."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    X_train, y_train, X_test, _ = _gaussian_classes([150, 90, 60, 30], 40, seed=1)
    a, n, K = 0.4, len(y_train), 4
    ours = _streamed_lda(X_train, y_train, a, chunk=45)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=a / (1 + a))
    reference.fit(_unit_rows(X_train), y_train)
    permutation = [ours.classes_.index(c) for c in reference.classes_]
    scores = ours.decision_function(torch.tensor(X_test)).numpy()[:, permutation]
    expected = reference.decision_function(_unit_rows(X_test)) - np.log(reference.priors_)
    np.testing.assert_allclose(n * (1 + a) / (n - K) * scores, expected, rtol=1e-7, atol=1e-7)
    # sklearn's own labels differ from ours, through its unequal priors alone.
    assert ours.predict(torch.tensor(X_test)) != list(reference.predict(_unit_rows(X_test)))
