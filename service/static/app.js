// The page for people, and a worked example of a client of the public API:
//   GET  models               the model list (GET models/{id} for one model's full card)
//   POST predict?model=ID&top_k=5&resize=true   multipart, field "files"
//   POST explain?model=ID&version=V&class=C&resize=true   multipart, field "file": the
//        occlusion heat map of one image for one class (default: the top class)
// No framework and no build step. URLs are relative, so the page also works behind a prefix.

const TOP_K = 5;
const REDUCED_SIDE = 128; // the copy offered when a picture is above the upload limit
const PARALLEL_IMAGES = 2; // pictures in flight at once (each asks every model)
// An explanation is ~50 images of work for the service (one per position of the grey
// square): one at a time, and only while no picture is being classified, so they never
// crowd out the classifications themselves (the service sheds what would wait too long).
const PARALLEL_EXPLANATIONS = 1;
const EXPLAIN_RETRIES = 2; // a busy service (503 + Retry-After) is asked again this often
const MAX_RETRY_WAIT = 5; // s
// Familiarity is the share of validation images less like the training data than this
// one: below 1 % the picture is stranger than 99 % of them and the answer is not trusted.
const UNFAMILIAR_BELOW = 0.01;
const UNUSUAL_BELOW = 0.05;
const HEAT_OPACITY = 70; // % : the picture shows through the heat map by default
const HEAT_UP = [215, 38, 30]; // red: covering the pixel lowered the class's probability
const HEAT_DOWN = [33, 102, 224]; // blue: covering it raised the probability

const $ = (selector, root = document) => root.querySelector(selector);
const models = []; // from GET models, in the service's order
const classNames = new Map(); // model id -> its class names (GET models/{id}), for the class picker
const explanations = []; // waiting calls to explain, oldest first
let explaining = 0;
let modelsLoaded = null; // a promise: predictions wait for the model list
const queue = [];
let running = 0;
let batchAnchor = null;
// Asked for only when the service answers 401 (API_KEYS set); sessionStorage, so it lives
// as long as this tab and is never written to disk by the page.
const KEY_STORE = 'cifar100-api-key';
let apiKey = sessionStorage.getItem(KEY_STORE) || '';

// --- talking to the API ------------------------------------------------------------

// Never throws: {ok, status, body, message}; message says what went wrong, in words.
async function api(path, options = {}) {
  const headers = new Headers(options.headers);
  if (apiKey) headers.set('Authorization', `Bearer ${apiKey}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    return { ok: false, status: 0, body: null, message: `Could not reach the service (${err.message}).` };
  }
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch {
    body = null;
  }
  if (response.ok) return { ok: true, status: response.status, body };
  if (response.status === 401) askForKey();
  const retryAfter = Number(response.headers.get('Retry-After')) || null; // seconds
  return { ok: false, status: response.status, body, retryAfter, message: explain(response, body, text) };
}

// The service's errors are {"detail": "..."} (FastAPI's validation errors: a list).
function explain(response, body, text) {
  let detail = body && body.detail;
  if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join('; ');
  if (typeof detail !== 'string' || !detail) detail = text.trim().slice(0, 200) || response.statusText;
  detail = detail.replace(/\.$/, '');
  const retry = response.headers.get('Retry-After');
  switch (response.status) {
    case 401:
      return `This service needs an API key: ${detail}. Enter it in the field above.`;
    case 413:
      return `Too large: ${detail}.`;
    case 422:
      return `Not accepted: ${detail}.`;
    case 404:
      return `Not found: ${detail}.`;
    case 503:
      return `The service is not ready: ${detail}. ` + (retry ? `Try again in ${retry} s.` : 'Try again in a moment.');
    default:
      return `The service answered ${response.status}: ${detail}.`;
  }
}

async function predict(blob, filename, modelId) {
  const form = new FormData();
  form.append('files', blob, filename);
  const query = new URLSearchParams({ top_k: TOP_K, resize: 'true' });
  if (modelId) query.set('model', modelId);
  const url = `predict?${query}`;
  const started = performance.now();
  const result = await api(url, { method: 'POST', body: form });
  result.roundTripMs = performance.now() - started;
  result.url = url;
  return result;
}

// One image's heat map for one class (null: the top class). The version is the one that
// answered /predict, so the map explains the bars shown beside it.
async function requestExplanation(blob, filename, modelId, version, classId) {
  const form = new FormData();
  form.append('file', blob, filename);
  const query = new URLSearchParams({ resize: 'true' });
  if (modelId) query.set('model', modelId);
  if (version) query.set('version', version);
  if (classId !== null && classId !== undefined) query.set('class', String(classId));
  return api(`explain?${query}`, { method: 'POST', body: form });
}

// Runs `job` (a function returning a promise that never rejects) when a slot is free.
function scheduleExplanation(job) {
  return new Promise((resolve) => {
    explanations.push({ job, resolve });
    pumpExplanations();
  });
}

function pumpExplanations() {
  while (explaining < PARALLEL_EXPLANATIONS && explanations.length && !running && !queue.length) {
    const { job, resolve } = explanations.shift();
    explaining += 1;
    job()
      .then(resolve, () => resolve(null))
      .finally(() => {
        explaining -= 1;
        pumpExplanations();
      });
  }
}

// --- small helpers -------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('data-') || key.startsWith('aria-') || key === 'href' || key === 'role')
      node.setAttribute(key, value);
    else node[key] = value;
  }
  node.append(...children.filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

const human = (name) => String(name).replaceAll('_', ' ');
const percent = (p) => (p > 0 && p < 0.001 ? '<0.1 %' : `${(p * 100).toFixed(1)} %`);
const bytes = (n) => (n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`);
const ms = (n) => (n < 10 ? n.toFixed(1) : Math.round(n).toString());
const versionOf = (info) => info.version ?? info.model_version ?? null;

function announce(message) {
  $('#status').textContent = message;
}

function askForKey() {
  const form = $('#key-form');
  if (!form.hidden) return;
  form.hidden = false;
  $('#api-key').focus();
}

function showServiceError(message) {
  const box = $('#service-error');
  box.textContent = message;
  box.hidden = !message;
}

// --- the model cards -----------------------------------------------------------------

const RECIPE_NAMES = {
  epochs: 'Epochs',
  batch_size: 'Batch size',
  learning_rate: 'Learning rate',
  weight_decay: 'Weight decay',
  augment: 'Augmentation',
  seed: 'Seed',
  optimizer: 'Optimizer',
  schedule: 'Learning-rate schedule',
  augmentation: 'Augmentation',
  checkpoint_selection: 'Checkpoint',
  source: 'Weights from',
  recipe: 'Recipe',
  method: 'Method',
  images: 'Images',
  top1_accuracy: 'Top-1 accuracy',
  top5_accuracy: 'Top-5 accuracy',
  superclass_accuracy: 'Superclass accuracy',
};
const capitalised = (text) => text.charAt(0).toUpperCase() + text.slice(1);

// In words, never raw JSON: {} is "none", {a: 1} is "a: 1", lists are comma-separated.
function describeValue(value) {
  if (typeof value === 'boolean') return value ? 'yes' : 'no';
  if (value === null || value === undefined) return '—';
  const parts = Array.isArray(value)
    ? value.map(describeValue)
    : typeof value === 'object' ? Object.entries(value).map(([k, v]) => `${human(k)}: ${describeValue(v)}`) : null;
  if (parts) return parts.length ? parts.join(', ') : 'none';
  return String(value);
}

// A <dl> of whatever the object holds: known keys get friendly names, new ones still show.
function definitionList(entries) {
  const list = el('dl');
  for (const [key, value] of entries) list.append(el('dt', { text: RECIPE_NAMES[key] || capitalised(human(key)) }), el('dd', { text: describeValue(value) }));
  return list;
}

// The recipe's fields that the method (training/recipe.py's Recipe.method) puts in words,
// by the method's key: where the card has those words, the raw fields would say the same
// thing a second time ("Optimizer: adamw" above "Optimizer: AdamW, weight decay 0.0005").
const DESCRIBED_BY_METHOD = {
  optimizer: ['optimizer', 'weight_decay'],
  schedule: ['schedule', 'learning_rate'],
  augmentation: ['augment'],
  dropout: ['conv_dropout', 'dense_dropout'],
  label_smoothing: ['label_smoothing'],
  precision: ['mixed_precision'],
  execution: ['deterministic', 'steps_per_execution'],
  classes: ['held_out_classes'],
};

function trainingSection(training) {
  if (!training || typeof training !== 'object' || !Object.keys(training).length) return el('p', { text: 'No training record in the file.' });
  const method = training.method && typeof training.method === 'object' ? training.method : {};
  // Only what this card's method describes: an older card's recipe fields still show.
  const described = new Set(Object.keys(method).flatMap((key) => DESCRIBED_BY_METHOD[key] || []));
  const entries = []; // recipe and method are objects: their fields, one line each
  for (const [key, value] of Object.entries(training)) {
    if (value && typeof value === 'object' && !Array.isArray(value)) {
      const fields = Object.entries(value);
      entries.push(...(key === 'recipe' ? fields.filter(([field]) => !described.has(field)) : fields));
    } else entries.push([key, value]);
  }
  return definitionList(entries);
}

function evaluationSection(evaluation) {
  if (!evaluation || typeof evaluation !== 'object') return [el('p', { text: 'Not evaluated on the test set.' })];
  const scores = [];
  for (const [key, value] of Object.entries(evaluation)) {
    if (typeof value !== 'number') continue;
    const isShare = /accuracy|error|ece/.test(key) && value >= 0 && value <= 1;
    scores.push([key, isShare ? percent(value) : value.toLocaleString('en')]);
  }
  const parts = [definitionList(scores)];
  const perClass = evaluation.per_class_accuracy;
  if (perClass && typeof perClass === 'object') {
    const ranked = Object.entries(perClass).filter(([, v]) => typeof v === 'number').sort((a, b) => b[1] - a[1]);
    if (ranked.length >= 6) {
      const line = (items) => items.map(([name, v]) => `${human(name)} ${percent(v)}`).join(', ');
      parts.push(el('p', { class: 'classes' }, el('strong', { text: 'Easiest classes: ' }), line(ranked.slice(0, 3))));
      parts.push(el('p', { class: 'classes' }, el('strong', { text: 'Hardest classes: ' }), line(ranked.slice(-3).reverse())));
    }
  }
  return parts;
}

async function reportLink(modelId) {
  const href = `models/${encodeURIComponent(modelId)}/report`;
  let found = false;
  try {
    const response = await fetch(`${href}/index.html`);
    found = response.ok;
    response.body?.cancel();
  } catch {
    found = false;
  }
  if (found) return el('p', { class: 'report' }, el('a', { href, text: `Read the report of ${modelId}` }), ': what makes CIFAR-100 hard for it.');
  return el('p', { class: 'report missing', text: 'No report for this model yet (`make report` writes one).' });
}

function renderCard(info, detail) {
  const card = { ...info, ...(detail || {}) };
  const version = versionOf(card);
  const facts = [];
  if (version !== null) facts.push(['version', version]);
  facts.push(['parameters', Number(card.parameter_count).toLocaleString('en')]);
  facts.push(['file', card.file]);
  const serving = card.serving || {};
  const on = serving.device === 'cuda' ? 'GPU' : `CPU, ${serving.instructions || 'no vector extensions'}`;
  facts.push(['runs on', `${serving.engine} in ${serving.precision} (${on})`]);
  if (card.provenance) facts.push(['provenance', card.provenance]);
  if (card.familiarity && card.familiarity.method) facts.push(['familiarity', card.familiarity.method]);
  facts.push(['status', card.ready ? 'ready' : 'not ready']);
  const title = el('h3', {}, card.model_id, card.default ? el('span', { class: 'badge', text: 'default' }) : null);
  const article = el(
    'article',
    { class: 'card', 'data-model-id': card.model_id },
    title,
    definitionList(facts),
    el('h4', { text: 'Training' }),
    trainingSection(card.training),
    el('h4', { text: card.evaluation && card.evaluation.images ? `Test set (${Number(card.evaluation.images).toLocaleString('en')} images)` : 'Test set' }),
    ...evaluationSection(card.evaluation),
  );
  const slot = el('p', { class: 'report', text: 'Looking for a report…' });
  article.append(slot);
  reportLink(card.model_id).then((link) => slot.replaceWith(link));
  return article;
}

async function loadModels() {
  const cards = $('#cards');
  const listing = await api('models');
  if (!listing.ok) {
    cards.replaceChildren(el('p', { class: 'error', text: `Could not read the model list. ${listing.message}` }));
    showServiceError(`Could not read the model list. ${listing.message}`);
    return;
  }
  const list = Array.isArray(listing.body.models) ? listing.body.models : [];
  models.push(...list);
  const details = await Promise.all(list.map((m) => api(`models/${encodeURIComponent(m.model_id)}`)));
  list.forEach((m, i) => {
    const names = details[i].ok ? details[i].body.class_names : null;
    if (Array.isArray(names)) classNames.set(m.model_id, names);
  });
  cards.replaceChildren(...list.map((m, i) => renderCard(m, details[i].ok ? details[i].body : null)));
  if (!list.length) {
    cards.replaceChildren(el('p', { text: 'No model is served.' }));
    showServiceError('No model is loaded, so pictures cannot be classified yet. Export one with `make train-export`, or see the files that could not be served below.');
  } else if (!list.some((m) => m.ready)) {
    showServiceError('The models are still warming up: pictures may be refused for a moment.');
  }
  const failed = Object.entries(listing.body.failed || {});
  if (failed.length) {
    $('#failed').replaceChildren(
      el('h3', { text: 'Files that could not be served' }),
      el('ul', {}, ...failed.map(([file, why]) => el('li', {}, el('code', { text: file }), `: ${why}`))),
    );
  }
}

// --- pictures in ---------------------------------------------------------------------

function addFiles(files) {
  const list = [...files];
  if (!list.length) return;
  $('#results-section').hidden = false;
  batchAnchor = $('#results').firstElementChild;
  for (const file of list) {
    const entry = newEntry(file);
    queue.push(entry);
  }
  announce(list.length === 1 ? `Classifying ${list[0].name || 'the picture'}…` : `Classifying ${list.length} pictures…`);
  pump();
}

function pump() {
  while (running < PARALLEL_IMAGES && queue.length) {
    const entry = queue.shift();
    running += 1;
    classify(entry).finally(() => {
      running -= 1;
      pump();
      pumpExplanations();
    });
  }
}

function newEntry(file) {
  const node = $('#result-template').content.firstElementChild.cloneNode(true);
  const name = file.name || 'pasted image';
  const entry = { node, blob: file, name, bitmap: null, url: null };
  $('.name', node).textContent = name;
  $('.meta', node).textContent = [bytes(file.size), file.type || 'unknown type'].join(' · ');
  $('#results').insertBefore(node, batchAnchor);
  entry.preview = showPreview(entry, file);
  return entry;
}

async function showPreview(entry, file) {
  const { node } = entry;
  try {
    // imageOrientation 'none': like the service, which decodes with Pillow and ignores the
    // EXIF orientation tag.
    entry.bitmap = await createImageBitmap(file, { imageOrientation: 'none' });
  } catch {
    for (const frame of node.querySelectorAll('.frame')) frame.replaceChildren(el('span', { class: 'no-preview', text: 'No preview: your browser cannot read this file as an image.' }));
    return;
  }
  const { width, height } = entry.bitmap;
  entry.url = URL.createObjectURL(file);
  const img = $('.original img', node);
  img.src = entry.url;
  img.alt = `${entry.name}, ${width}×${height} pixels`;
  if (width <= 160 && height <= 160) $('.original figcaption', node).textContent = 'Your picture, actual size';
  $('.meta', node).textContent = [`${width}×${height} px`, bytes(file.size), file.type || 'unknown type'].join(' · ');
  const canvas = $('.seen canvas', node);
  drawSeen(canvas, entry.bitmap);
  canvas.setAttribute('role', 'img');
  canvas.setAttribute('aria-label', `${entry.name} as the model receives it: 32 by 32 pixels, enlarged`);
}

// A PREVIEW of what the service feeds the model with resize=true (service/images.py:
// transparency on white, centre crop to a square, resize to 32x32). The browser resamples
// with its own filter, not Pillow's Lanczos, so a pixel may differ slightly: the service does
// the real decode and this drawing is never sent.
function drawSeen(canvas, bitmap) {
  const side = Math.min(bitmap.width, bitmap.height);
  const left = Math.floor((bitmap.width - side) / 2);
  const top = Math.floor((bitmap.height - side) / 2);
  const context = canvas.getContext('2d');
  context.fillStyle = '#fff';
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.imageSmoothingEnabled = true;
  context.imageSmoothingQuality = 'high';
  context.drawImage(bitmap, left, top, side, side, 0, 0, canvas.width, canvas.height);
}

// --- answers out ---------------------------------------------------------------------

async function classify(entry) {
  const { node } = entry;
  await Promise.all([modelsLoaded, entry.preview]);
  const grid = $('.models', node);
  const problem = $('.problem', node);
  problem.hidden = true;
  $('.verdict', node).hidden = true;
  node.setAttribute('aria-busy', 'true');
  const ids = models.length ? models.map((m) => m.model_id) : [null]; // null: the service's default
  grid.replaceChildren(...ids.map((id) => el('section', { class: 'model-result pending', 'data-model-id': id || '' }, el('h4', { text: id || 'default model' }), el('p', { text: 'Asking the model…' }))));
  const results = await Promise.all(ids.map((id) => predict(entry.blob, entry.name, id)));
  node.removeAttribute('aria-busy');

  const failures = results.filter((r) => !r.ok);
  if (failures.length === results.length && failures.every((r) => r.message === failures[0].message)) {
    grid.replaceChildren();
    problem.replaceChildren(el('p', { text: failures[0].message }));
    if (failures[0].status === 413 && entry.bitmap) problem.append(reduceButton(entry));
    problem.hidden = false;
    node.dataset.state = 'error';
    announce(`${entry.name}: ${failures[0].message}`);
    return;
  }
  node.dataset.state = 'done';
  const explainers = [];
  const columns = results.map((result, i) => (result.ok ? modelColumn(result, entry, explainers) : errorColumn(ids[i], result)));
  grid.replaceChildren(...columns);
  compare(node, results.filter((r) => r.ok));
  for (const explainer of explainers) explainer.show(null); // the top class of each model
}

function reduceButton(entry) {
  const button = el('button', { type: 'button', class: 'reduce', text: `Send a ${REDUCED_SIDE}×${REDUCED_SIDE} copy made by your browser` });
  button.addEventListener('click', async () => {
    // Centre crop and shrink here, then let the service make its 32x32 from the copy.
    const canvas = el('canvas', { width: REDUCED_SIDE, height: REDUCED_SIDE });
    drawSeen(canvas, entry.bitmap);
    entry.blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
    entry.name = entry.name.replace(/(\.\w+)?$/, `-${REDUCED_SIDE}.png`);
    $('.meta', entry.node).append(` · sent as a ${REDUCED_SIDE}×${REDUCED_SIDE} PNG copy (${bytes(entry.blob.size)}) made by your browser`);
    $('.name', entry.node).focus();
    classify(entry);
  });
  return button;
}

function errorColumn(modelId, result) {
  return el('section', { class: 'model-result failed', 'data-model-id': modelId || '' }, el('h4', { text: modelId || 'default model' }), el('p', { class: 'error', role: 'alert', text: result.message }));
}

function modelColumn(result, entry, explainers) {
  const body = result.body;
  const prediction = body.predictions[0];
  const info = models.find((m) => m.model_id === body.model_id) || {};
  const version = versionOf(info);
  const bars = el('ol', { class: 'bars', 'aria-label': `Top ${prediction.top_k.length} classes: choose one to see where the model looked for it` });
  for (const item of prediction.top_k) {
    const fill = el('span', { class: 'fill' });
    fill.style.width = `${Math.max(0, Math.min(1, item.probability)) * 100}%`;
    bars.append(
      el(
        'li',
        { class: 'bar-row', 'data-class-id': item.class_id, 'data-label': item.label, 'data-probability': item.probability },
        el(
          'button',
          { type: 'button', class: 'bar-pick', 'aria-pressed': 'false' },
          el('span', { class: 'bar-label', text: human(item.label) }),
          el('span', { class: 'bar', 'aria-hidden': 'true' }, fill),
          el('span', { class: 'bar-value', text: percent(item.probability) }),
          el('span', { class: 'pick visually-hidden' }),
        ),
      ),
    );
  }
  const superclass = prediction.superclass;
  const auth = apiKey ? ` -H "Authorization: Bearer $API_KEY"` : ''; // never the key itself
  const curl = `curl${auth} -F 'files=@${entry.name}' '${new URL(result.url, document.baseURI)}'`;
  const explainQuery = new URLSearchParams({ model: body.model_id, version: body.model_version, resize: 'true' });
  const explainCurl = `curl${auth} -F 'file=@${entry.name}' '${new URL(`explain?${explainQuery}`, document.baseURI)}'   # add &class=ID for another class`;
  const familiarity = familiarityNote(prediction.familiarity);
  const unfamiliar = familiarity.classList.contains('unfamiliar');
  const heat = $('#heat-template').content.firstElementChild.cloneNode(true);
  const section = el(
    'section',
    { class: 'model-result', 'data-model-id': body.model_id },
    el('h4', {}, body.model_id, version !== null ? el('span', { class: 'version', text: ` version ${version}` }) : null),
    unfamiliar ? familiarity : null, // before the answer it casts doubt on
    bars,
    el(
      'p',
      { class: 'superclass', 'data-label': superclass.label, 'data-probability': superclass.probability },
      'Superclass ',
      el('strong', { text: human(superclass.label) }),
      ' ',
      el('span', { class: 'superclass-value', text: percent(superclass.probability) }),
      el('span', { class: 'note', text: ' (its five classes summed)' }),
    ),
    unfamiliar ? null : familiarity,
    el('p', { class: 'timing', 'data-inference-ms': body.inference_ms }, `Inference ${ms(body.inference_ms)} ms · round trip ${ms(result.roundTripMs)} ms`),
    heat,
    el('details', { class: 'raw' }, el('summary', { text: 'Request and response' }), el('pre', { text: curl }), el('pre', { text: JSON.stringify(body, null, 2) }), el('p', { class: 'note', text: 'The heat map, from the same version:' }), el('pre', { text: explainCurl })),
  );
  explainers.push(explainer(section, heat, entry, body));
  return section;
}

// --- familiarity -----------------------------------------------------------------------

// Stranger than this share of the validation images, never rounded up to 100 %.
function strangerThan(value) {
  if (value <= 0) return 'every one';
  return `${(Math.floor((1 - value) * 1000 + 1e-6) / 10).toFixed(1)} %`; // 1e-6: a float32 0.004 is 0.00400000019
}

const shareOf = (value) => `${(value * 100).toFixed(value < 0.1 ? 1 : 0)} %`;

// In words: a warning below UNFAMILIAR_BELOW, the share otherwise, and for a model without
// the output no number at all (it cannot tell, which is not the same as "familiar").
function familiarityNote(value) {
  if (typeof value !== 'number' || !Number.isFinite(value)) {
    return el('p', { class: 'familiarity none', 'data-familiarity': '' }, 'No familiarity check: this model file has no familiarity output, so the page cannot say whether the picture is like the images it was trained on.');
  }
  if (value < UNFAMILIAR_BELOW) {
    return el(
      'p',
      { class: 'familiarity unfamiliar', 'data-familiarity': value },
      el('strong', { text: 'Unlike the training data. ' }),
      `This image is unlike the images the model was trained on (stranger than ${strangerThan(value)} of the validation images): don't trust this answer.`,
    );
  }
  const share = `more like the training data than ${shareOf(value)} of the validation images`;
  if (value < UNUSUAL_BELOW) return el('p', { class: 'familiarity unusual', 'data-familiarity': value }, el('strong', { text: 'Unusual picture for this model: ' }), `${share}; take the answer with care.`);
  return el('p', { class: 'familiarity', 'data-familiarity': value }, el('strong', { text: 'Familiarity: ' }), `${share}.`);
}

// --- where the model looked: the heat map of /explain -------------------------------------

// Which third of the picture a pixel is in, in words, for the canvas's text alternative.
function region(row, column, size) {
  const rows = ['top', 'middle', 'bottom'][Math.min(2, Math.floor((row * 3) / size))];
  const columns = ['left', 'centre', 'right'][Math.min(2, Math.floor((column * 3) / size))];
  if (rows === 'middle' && columns === 'centre') return 'centre';
  return `${rows} ${columns}`;
}

const points = (value) => `${(value * 100).toFixed(1)} percentage points`;

// The map on a canvas of its own size (32x32): red where covering lowered the class's
// probability, blue where it raised it, the opacity in proportion to the change, so that
// pixels which made no difference leave the picture beneath untouched. Returns the scale:
// the largest change, drawn at full strength.
function drawHeat(canvas, map) {
  const height = map.length;
  const width = height ? map[0].length : 0;
  canvas.width = width;
  canvas.height = height;
  const context = canvas.getContext('2d');
  context.clearRect(0, 0, width, height);
  const scale = Math.max(0, ...map.map((row) => Math.max(...row.map(Math.abs))));
  if (!width || !height) return scale;
  const image = context.createImageData(width, height);
  for (let y = 0; y < height; y += 1) {
    for (let x = 0; x < width; x += 1) {
      const value = map[y][x];
      const [r, g, b] = value >= 0 ? HEAT_UP : HEAT_DOWN;
      const i = (y * width + x) * 4;
      image.data[i] = r;
      image.data[i + 1] = g;
      image.data[i + 2] = b;
      image.data[i + 3] = scale > 0 ? Math.round((Math.abs(value) / scale) * 255) : 0;
    }
  }
  context.putImageData(image, 0, 0);
  return scale;
}

function describeHeat(map, label) {
  let most = { value: 0 };
  let least = { value: 0 };
  map.forEach((row, y) =>
    row.forEach((value, x) => {
      if (value > most.value) most = { value, y, x };
      if (value < least.value) least = { value, y, x };
    }),
  );
  const findings = [];
  if (most.value) findings.push(`covering the ${region(most.y, most.x, map.length)} lowered its probability most, by ${points(most.value)}`);
  if (least.value) findings.push(`covering the ${region(least.y, least.x, map.length)} raised it most, by ${points(-least.value)}`);
  if (!findings.length) findings.push('covering any part of it made no difference');
  return `Heat map over the 32 by 32 picture for ${label}: ${findings.join('; ')}.`;
}

// One model column's heat map: the top class at first, then whichever class is asked for
// (a bar clicked, or any class from the list). Only the latest request is drawn.
function explainer(section, heat, entry, body) {
  const modelId = body.model_id;
  const version = body.model_version;
  const names = classNames.get(modelId) || [];
  const labelOf = (classId) => {
    const row = section.querySelector(`.bar-row[data-class-id="${classId}"]`);
    return row ? row.dataset.label : names[classId] ?? `class ${classId}`;
  };
  const base = $('.heat-base', heat);
  const canvas = $('.heat-map', heat);
  const title = $('.heat-title', heat);
  const problem = $('.heat-problem', heat);
  const picker = $('.heat-class', heat);
  const opacity = $('.heat-opacity', heat);
  const legend = $('.legend', heat);
  const seen = $('.seen canvas', entry.node);
  if (entry.bitmap && seen) base.getContext('2d').drawImage(seen, 0, 0, base.width, base.height);
  else base.remove(); // no preview: the map alone, over the checkerboard
  canvas.setAttribute('aria-label', `Where ${modelId} looked: not worked out yet`);
  opacity.value = String(HEAT_OPACITY);
  const setOpacity = () => {
    canvas.style.opacity = String(Number(opacity.value) / 100);
    $('.legend-bar', heat).style.opacity = canvas.style.opacity;
  };
  setOpacity();
  opacity.addEventListener('input', setOpacity);
  opacity.setAttribute('aria-label', `Heat map opacity for ${modelId}`); // the visible label, and whose
  if (names.length) {
    const order = names.map((name, id) => [id, name]).sort((a, b) => human(a[1]).localeCompare(human(b[1])));
    picker.replaceChildren(...order.map(([id, name]) => el('option', { value: String(id), text: human(name) })));
    picker.value = String(body.predictions[0].top_k[0].class_id); // what is explained first
    $('.heat-choice', heat).hidden = false;
  }
  let latest = 0;

  async function show(classId) {
    const token = ++latest;
    const label = classId === null ? null : labelOf(classId);
    heat.dataset.state = 'loading';
    heat.setAttribute('aria-busy', 'true');
    problem.hidden = true;
    title.textContent = label === null ? `Finding where ${modelId} looked…` : `Finding where ${modelId} looked for ${human(label)}…`;
    let answer = null;
    for (let attempt = 0; ; attempt += 1) {
      answer = await scheduleExplanation(async () => {
        // A newer choice, or the results cleared, before our turn: nothing to ask for.
        if (token !== latest || !section.isConnected) return null;
        return requestExplanation(entry.blob, entry.name, modelId, version, classId);
      });
      if (!answer || answer.status !== 503 || !answer.retryAfter || attempt >= EXPLAIN_RETRIES) break;
      const wait = Math.min(answer.retryAfter, MAX_RETRY_WAIT);
      title.textContent = `The service is busy: asking again in ${wait} s…`;
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
    }
    if (token !== latest || !answer) return;
    heat.removeAttribute('aria-busy');
    const explanation = answer.ok ? answer.body?.explanations?.[0] : null;
    const map = explanation?.heat_map;
    if (!answer.ok || !Array.isArray(map) || !map.length || !map.every((row) => Array.isArray(row) && row.length === map[0].length)) {
      heat.dataset.state = 'error';
      for (const key of ['classId', 'label', 'scale', 'heatMap']) delete heat.dataset[key]; // nothing drawn is shown
      title.textContent = `Where ${modelId} looked: not available`;
      const retry = el('button', { type: 'button', class: 'retry', text: 'Try again' });
      retry.addEventListener('click', () => show(classId));
      problem.replaceChildren(el('p', { text: answer.ok ? 'The service answered without a usable heat map.' : `Could not explain the answer. ${answer.message}` }), retry);
      problem.hidden = false;
      canvas.getContext('2d').clearRect(0, 0, canvas.width, canvas.height);
      return;
    }
    const scale = drawHeat(canvas, map);
    const shown = human(explanation.label);
    heat.dataset.state = 'done';
    heat.dataset.classId = String(explanation.class_id);
    heat.dataset.label = explanation.label;
    heat.dataset.scale = String(scale);
    heat.dataset.heatMap = JSON.stringify(map);
    title.replaceChildren('Where the model looked for ', el('strong', { text: shown }), ` (${percent(explanation.probability)})`);
    $('.heat-how', heat).textContent = ` A grey ${explanation.patch}×${explanation.patch} square was slid over the 32×32 picture (shown in grey beneath) in steps of ${explanation.stride} pixels; each pixel shows how much covering it changed the probability of ${shown}.`;
    canvas.setAttribute('aria-label', describeHeat(map, shown));
    for (const node of legend.querySelectorAll('.legend-label')) node.textContent = shown;
    $('.legend-low', legend).textContent = `−${(scale * 100).toFixed(1)}`;
    $('.legend-high', legend).textContent = `+${(scale * 100).toFixed(1)} points`;
    $('.legend-ends', legend).hidden = !scale;
    $('.legend-scale', legend).textContent = scale ? points(scale) : `none: covering any part changed the probability of ${shown} by less than 0.001 percentage points`;
    picker.value = String(explanation.class_id);
    for (const row of section.querySelectorAll('.bar-row')) $('.bar-pick', row).setAttribute('aria-pressed', String(row.dataset.classId === String(explanation.class_id)));
  }

  for (const row of section.querySelectorAll('.bar-row')) $('.bar-pick', row).addEventListener('click', () => show(Number(row.dataset.classId)));
  picker.addEventListener('change', () => show(Number(picker.value)));
  return { show };
}

// Side by side: say whether the models agree, and mark in each list the other models' picks.
function compare(node, answers) {
  const verdict = $('.verdict', node);
  const doubt = (p) => (typeof p.familiarity === 'number' && p.familiarity < UNFAMILIAR_BELOW ? ', but the picture is unlike its training data' : '');
  const summary = answers.map((r) => `${r.body.model_id} says ${human(r.body.predictions[0].top_k[0].label)} (${percent(r.body.predictions[0].top_k[0].probability)}${doubt(r.body.predictions[0])})`);
  const name = $('.name', node).textContent;
  if (answers.length < 2) {
    announce(`${name}: ${summary.join('; ') || 'no answer'}.`);
    return;
  }
  const firsts = answers.map((r) => r.body.predictions[0].top_k[0]);
  const supers = answers.map((r) => r.body.predictions[0].superclass.label);
  const agree = firsts.every((f) => f.class_id === firsts[0].class_id);
  const superAgree = supers.every((s) => s === supers[0]);
  node.dataset.agree = String(agree);
  verdict.replaceChildren();
  if (agree) {
    verdict.append(answers.length === 2 ? 'Both models say ' : 'All models say ', el('strong', { text: human(firsts[0].label) }), '.');
  } else {
    verdict.append(el('span', { class: 'flag', text: 'The models disagree: ' }));
    answers.forEach((r, i) => verdict.append(i ? ', ' : '', `${r.body.model_id} says `, el('strong', { text: human(firsts[i].label) })));
    verdict.append(superAgree ? `, but they agree on the superclass ${human(supers[0])}.` : `, and on the superclass too: ${supers.map(human).join(' vs ')}.`);
  }
  verdict.hidden = false;
  for (const [i, answer] of answers.entries()) {
    const column = node.querySelector(`.model-result[data-model-id="${CSS.escape(answer.body.model_id)}"]`);
    const others = answers.filter((_, j) => j !== i);
    for (const row of column.querySelectorAll('.bar-row')) {
      const pickers = others.filter((o) => String(o.body.predictions[0].top_k[0].class_id) === row.dataset.classId);
      if (!pickers.length) continue;
      row.classList.add('other-pick');
      $('.pick', row).textContent = ` (first choice of ${pickers.map((o) => o.body.model_id).join(', ')})`;
    }
    if (!agree) {
      $('.bar-row', column).classList.add('disputed');
      const missing = others.filter((o) => !column.querySelector(`.bar-row[data-class-id="${o.body.predictions[0].top_k[0].class_id}"]`));
      for (const o of missing) column.querySelector('.bars').after(el('p', { class: 'absent', text: `${o.body.model_id}'s first choice, ${human(o.body.predictions[0].top_k[0].label)}, is not in this model's top ${TOP_K}.` }));
    }
  }
  announce(`${name}: ${summary.join('; ')}. ${agree ? 'The models agree.' : 'The models disagree.'}`);
}

// --- wiring ----------------------------------------------------------------------------

function wire() {
  const input = $('#files');
  input.addEventListener('change', () => {
    addFiles(input.files);
    input.value = ''; // the same file picked again is classified again
  });
  const drop = $('#drop');
  for (const type of ['dragenter', 'dragover']) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add('dragging');
    });
  }
  for (const type of ['dragleave', 'drop']) drop.addEventListener(type, () => drop.classList.remove('dragging'));
  drop.addEventListener('drop', (event) => {
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });
  // A file dropped beside the zone must not make the browser navigate away from the page.
  window.addEventListener('dragover', (event) => event.preventDefault());
  window.addEventListener('drop', (event) => event.preventDefault());
  document.addEventListener('paste', (event) => {
    const files = [...(event.clipboardData?.files || [])];
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  for (const button of document.querySelectorAll('button.sample')) {
    button.addEventListener('click', async () => {
      const src = button.dataset.src;
      const response = await fetch(src);
      if (!response.ok) {
        announce(`The sample ${src} could not be loaded (${response.status}).`);
        return;
      }
      const blob = await response.blob();
      addFiles([new File([blob], src.split('/').pop(), { type: blob.type || 'image/png' })]);
    });
  }
  $('#key-form').addEventListener('submit', (event) => {
    event.preventDefault();
    apiKey = $('#api-key').value.trim();
    sessionStorage.setItem(KEY_STORE, apiKey);
    $('#key-form').hidden = true;
    showServiceError('');
    announce('Key kept for this tab; reading the model list again.');
    models.length = 0;
    modelsLoaded = loadModels();
    input.focus();
  });
  $('#clear').addEventListener('click', () => {
    for (const img of document.querySelectorAll('#results img')) if (img.src.startsWith('blob:')) URL.revokeObjectURL(img.src);
    $('#results').replaceChildren();
    $('#results-section').hidden = true;
    announce('Results cleared.');
    input.focus();
  });
}

wire();
modelsLoaded = loadModels();
