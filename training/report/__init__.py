"""What characterises a 100-class dataset, seen through our exported models.

`python -m training report` calls write.write_reports, which, per model:
    scores the test set through service.classifier.Classifier (as the service would),
    analysis.py   runs measures.py over the scores: every number, into report.json;
    sentences.py  derives the findings (sentences) from those numbers;
    dataset.py    describes the dataset itself (counts, colours, duplicates), once;
    figures.py    plots the numbers (matplotlib), montages.py shows the images (Pillow);
    pages.py      renders index.html from templates/ (Jinja2, autoescaped).
Offline and deterministic: the same models and data give the same bytes.
"""
