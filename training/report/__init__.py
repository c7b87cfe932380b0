"""What characterises a 100-class dataset, seen through our exported models.

`python -m training report` calls write.write_reports, which, per model:
    scores the test set through contract.classifier.Classifier (as the service would),
    analysis.py   runs measures.py over the scores: every number, into report.json
                  (a model whose recipe held classes out: over the other classes' images;
                  the held-out ones, and --unfamiliar images read by unfamiliar.py, go to
                  the familiarity section, when the file has that output);
    occlusion.py  explains the most confused pairs with contract/occlusion.py's heat maps;
    sentences.py  derives the findings (sentences) from those numbers;
    dataset.py    describes the dataset itself (counts, colours, duplicates), once;
    figures.py    plots the numbers (matplotlib), montages.py shows the images (Pillow);
    pages.py      renders index.html from templates/ (Jinja2, autoescaped).
Offline and deterministic: the same models and data give the same bytes.
"""
