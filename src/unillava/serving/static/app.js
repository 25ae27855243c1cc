// unillava web page: image upload/paste, streaming chat, box/point visual prompts and mask overlays.
// Plain browser JavaScript, no build step; window.unillava exposes the pure parts for tests.
"use strict";

(function () {
  const MAX_SIDE = 2048; // larger uploads are downscaled before sending, so requests stay small
  const COLORS = [[0, 130, 200], [60, 180, 75], [230, 25, 75], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190], [0, 128, 128]];

  const $ = (id) => document.getElementById(id);
  const state = {
    model: null,
    capabilities: { visual_prompts: false, segmentation: false },
    history: [],        // OpenAI messages sent so far (user and assistant turns)
    imagesInHistory: 0, // images already in `history`, so the next one's image_index is known
    image: null,        // {dataUrl, width, height, sent}
    prompts: [],        // visual prompts on the current image, in its pixels
    tool: "none",
    controller: null,
  };

  // ---------------------------------------------------------------------------------------------
  // COCO RLE (the server's mask format): counts are column-major runs, starting with background.

  function rleCounts(counts) {
    if (Array.isArray(counts)) return counts.slice();
    const out = [];
    let p = 0;
    while (p < counts.length) {
      let x = 0, k = 0, more = true;
      while (more) {
        if (p >= counts.length) throw new Error("RLE counts string ends inside a number");
        if (k > 6) throw new Error("RLE count too large");
        const c = counts.charCodeAt(p) - 48;
        if (c < 0 || c > 63) throw new Error("invalid character in RLE counts");
        x |= (c & 0x1f) << (5 * k);
        more = (c & 0x20) !== 0;
        p++; k++;
        if (!more && (c & 0x10)) x |= -1 << (5 * k);
      }
      if (out.length > 2) x += out[out.length - 2];
      out.push(x);
    }
    return out;
  }

  // {size: [h, w], counts} -> {height, width, data: Uint8Array in row-major order}
  function decodeRle(rle) {
    const [h, w] = rle.size;
    const counts = rleCounts(rle.counts);
    const total = counts.reduce((a, b) => a + b, 0);
    if (total !== h * w || counts.some((n) => n < 0)) throw new Error(`RLE covers ${total} pixels, size ${h}x${w}`);
    const data = new Uint8Array(h * w);
    let i = 0, on = false;
    for (const n of counts) {
      if (on) {
        for (let j = i; j < i + n; j++) {
          const x = Math.floor(j / h);
          data[(j - x * h) * w + x] = 1;
        }
      }
      i += n;
      on = !on;
    }
    return { height: h, width: w, data };
  }

  // ---------------------------------------------------------------------------------------------
  // Mask overlay

  function clearMasks() {
    const layer = $("mask-layer");
    layer.getContext("2d").clearRect(0, 0, layer.width, layer.height);
    $("mask-legend").replaceChildren();
  }

  // Draw masks (the response's `masks`) over the current image; returns how many were drawn.
  function renderMasks(masks, imageIndex) {
    clearMasks();
    const layer = $("mask-layer");
    const ctx = layer.getContext("2d");
    const legend = $("mask-legend");
    let drawn = 0;
    (masks || []).forEach((mask, k) => {
      if (imageIndex !== undefined && (mask.image_index || 0) !== imageIndex) return;
      const decoded = decodeRle(mask.segmentation);
      const [r, g, b] = COLORS[k % COLORS.length];
      const off = document.createElement("canvas");
      off.width = decoded.width;
      off.height = decoded.height;
      const octx = off.getContext("2d");
      const pixels = octx.createImageData(decoded.width, decoded.height);
      for (let p = 0; p < decoded.data.length; p++) {
        if (decoded.data[p]) {
          pixels.data[4 * p] = r; pixels.data[4 * p + 1] = g; pixels.data[4 * p + 2] = b; pixels.data[4 * p + 3] = 120;
        }
      }
      octx.putImageData(pixels, 0, 0);
      ctx.drawImage(off, 0, 0, layer.width, layer.height);
      const sx = layer.width / decoded.width, sy = layer.height / decoded.height;
      const [bx, by, bw, bh] = mask.bbox || [0, 0, 0, 0];
      ctx.strokeStyle = `rgb(${r},${g},${b})`;
      ctx.lineWidth = Math.max(1, layer.width / 300);
      ctx.strokeRect(bx * sx, by * sy, bw * sx, bh * sy);
      if (mask.phrase) {
        const size = Math.max(10, Math.round(layer.width / 35));
        ctx.font = `${size}px system-ui, sans-serif`;
        const tw = ctx.measureText(mask.phrase).width;
        const ty = Math.max(size + 4, by * sy);
        ctx.fillStyle = `rgba(${r},${g},${b},0.85)`;
        ctx.fillRect(bx * sx, ty - size - 4, tw + 8, size + 6);
        ctx.fillStyle = "#fff";
        ctx.fillText(mask.phrase, bx * sx + 4, ty - 4);
      }
      const li = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${r},${g},${b})`;
      const label = document.createElement("span");
      label.className = "mask-phrase";
      label.textContent = (mask.phrase || `mask ${k + 1}`) + (mask.score != null ? ` (${mask.score.toFixed(2)})` : "");
      li.append(swatch, label);
      legend.append(li);
      drawn++;
    });
    return drawn;
  }

  // ---------------------------------------------------------------------------------------------
  // Image and visual prompts

  function setStatus(text) { $("status").textContent = text; }

  function loadImageFile(file) {
    if (!file || !file.type.startsWith("image/")) { showError("That file is not an image."); return; }
    const reader = new FileReader();
    reader.onload = () => setImage(reader.result);
    reader.onerror = () => showError("Could not read the file.");
    reader.readAsDataURL(file);
  }

  // Show an image (a data URL) and make it the one the next message carries.
  function setImage(dataUrl) {
    return new Promise((resolve, reject) => {
      const probe = new Image();
      probe.onload = () => {
        let url = dataUrl, width = probe.naturalWidth, height = probe.naturalHeight;
        const scale = Math.min(1, MAX_SIDE / Math.max(width, height));
        if (scale < 1) {
          width = Math.round(width * scale); height = Math.round(height * scale);
          const c = document.createElement("canvas");
          c.width = width; c.height = height;
          c.getContext("2d").drawImage(probe, 0, 0, width, height);
          url = c.toDataURL("image/jpeg", 0.92);
        }
        state.image = { dataUrl: url, width, height, sent: false };
        state.prompts = [];
        const img = $("image");
        img.src = url;
        // Small images get finer overlay canvases, so outlines and labels stay sharp when scaled up.
        const k = Math.min(4, Math.max(1, Math.ceil(800 / Math.max(width, height))));
        for (const id of ["mask-layer", "prompt-layer"]) { $(id).width = width * k; $(id).height = height * k; }
        $("stage").hidden = false;
        $("dropzone").classList.add("has-image");
        clearMasks();
        drawPrompts();
        setStatus(`image ${width}×${height}`);
        resolve(state.image);
      };
      probe.onerror = () => { showError("The browser cannot decode that image."); reject(new Error("bad image")); };
      probe.src = dataUrl;
    });
  }

  function removeImage() {
    state.image = null;
    state.prompts = [];
    $("stage").hidden = true;
    $("image").removeAttribute("src");
    $("dropzone").classList.remove("has-image");
    clearMasks();
    drawPrompts();
  }

  function drawPrompts(preview) {
    const layer = $("prompt-layer");
    const ctx = layer.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, layer.width, layer.height);
    const width = state.image ? state.image.width : layer.width;
    const k = layer.width / width;
    ctx.setTransform(k, 0, 0, k, 0, 0); // draw in image pixels
    const line = Math.max(2 / k, width / 250);
    const all = preview ? [...state.prompts, preview] : state.prompts;
    all.forEach((p, i) => {
      ctx.lineWidth = line;
      if (p.type === "box") {
        const [x0, y0, x1, y1] = p.box;
        ctx.strokeStyle = "#00e676";
        ctx.setLineDash(p === preview ? [line * 3, line * 2] : []);
        ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
        ctx.setLineDash([]);
      } else {
        const [x, y] = p.point;
        ctx.beginPath();
        ctx.arc(x, y, line * 3, 0, 2 * Math.PI);
        ctx.fillStyle = p.label === 0 ? "#ff1744" : "#00e676";
        ctx.fill();
        ctx.strokeStyle = "#fff";
        ctx.stroke();
      }
      if (p !== preview) {
        ctx.font = `${Math.max(10 / k, width / 40)}px system-ui, sans-serif`;
        ctx.fillStyle = "#00e676";
        const [lx, ly] = p.type === "box" ? [p.box[0] + line, p.box[1] - line] : [p.point[0] + line * 4, p.point[1]];
        ctx.fillText(String(i + 1), lx, Math.max(12 / k, ly));
      }
    });
    const list = $("prompt-list");
    list.replaceChildren();
    state.prompts.forEach((p, i) => {
      const li = document.createElement("li");
      const text = document.createElement("span");
      text.textContent = p.type === "box"
        ? `${i + 1}. box [${p.box.map(Math.round).join(", ")}]`
        : `${i + 1}. ${p.label === 0 ? "background " : ""}point [${p.point.map(Math.round).join(", ")}]`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = "Remove this prompt";
      remove.onclick = () => { state.prompts.splice(i, 1); drawPrompts(); };
      li.append(text, remove);
      list.append(li);
    });
  }

  function toImagePixels(event) {
    const { width, height } = state.image;
    const rect = $("prompt-layer").getBoundingClientRect();
    const x = (event.clientX - rect.left) * width / rect.width;
    const y = (event.clientY - rect.top) * height / rect.height;
    return [Math.min(Math.max(x, 0), width), Math.min(Math.max(y, 0), height)];
  }

  function setupDrawing() {
    const layer = $("prompt-layer");
    let start = null;
    layer.addEventListener("pointerdown", (e) => {
      if (!state.image || state.tool === "none") return;
      const [x, y] = toImagePixels(e);
      if (state.tool === "point") {
        state.prompts.push({ type: "point", point: [x, y], label: e.shiftKey ? 0 : 1 });
        drawPrompts();
        return;
      }
      start = [x, y];
      layer.setPointerCapture(e.pointerId);
    });
    layer.addEventListener("pointermove", (e) => {
      if (!start) return;
      const [x, y] = toImagePixels(e);
      drawPrompts({ type: "box", box: boxFrom(start, [x, y]) });
    });
    const end = (e) => {
      if (!start) return;
      const box = boxFrom(start, toImagePixels(e));
      start = null;
      if (box[2] - box[0] >= 2 && box[3] - box[1] >= 2) state.prompts.push({ type: "box", box });
      drawPrompts();
    };
    layer.addEventListener("pointerup", end);
    layer.addEventListener("pointercancel", () => { start = null; drawPrompts(); });
  }

  function boxFrom(a, b) {
    return [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  }

  function setTool(tool) {
    state.tool = tool;
    for (const b of document.querySelectorAll("#tools [data-tool]")) b.setAttribute("aria-pressed", String(b.dataset.tool === tool));
    $("prompt-layer").classList.toggle("drawing", tool !== "none");
  }

  // ---------------------------------------------------------------------------------------------
  // Chat

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function addMessage(role, text, thumb) {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    if (thumb) {
      const img = document.createElement("img");
      img.className = "thumb";
      img.src = thumb;
      img.alt = "attached image";
      div.append(img);
    }
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    div.append(body);
    $("log").append(div);
    $("log").scrollTop = $("log").scrollHeight;
    return div;
  }

  function showError(message) {
    const div = addMessage("error", message);
    div.setAttribute("role", "alert");
    return div;
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error) return body.error.message;
    } catch (_) { /* not JSON: fall through */ }
    return `HTTP ${response.status}`;
  }

  async function send(text) {
    if (state.controller) return;
    const content = [];
    let imageIndex = null;
    let thumb = null;
    if (state.image && !state.image.sent) {
      content.push({ type: "image_url", image_url: { url: state.image.dataUrl } });
      imageIndex = state.imagesInHistory;
      thumb = state.image.dataUrl;
    } else if (state.image) {
      imageIndex = state.image.index;
    }
    content.push({ type: "text", text });
    const userMessage = { role: "user", content };
    const request = {
      model: state.model || undefined,
      messages: [...state.history, userMessage],
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: Number($("max-tokens").value) || undefined,
      temperature: Number($("temperature").value) || 0,
    };
    if (state.prompts.length) {
      request.visual_prompts = state.prompts.map((p) => ({ ...p, image_index: imageIndex ?? 0 }));
    }
    if ($("return-masks").checked) request.return_masks = true;

    addMessage("user", text, thumb);
    const bubble = addMessage("assistant", "");
    bubble.dataset.state = "streaming";
    const out = bubble.querySelector(".text");
    state.controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const started = performance.now();
    let answer = "", usage = null, finish = null, failed = null;
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              const delta = choice.delta || {};
              if (delta.content) { answer += delta.content; out.textContent = answer; $("log").scrollTop = $("log").scrollHeight; }
              if (delta.masks && delta.masks.length && imageIndex !== null) renderMasks(delta.masks, imageIndex);
              if (choice.finish_reason) finish = choice.finish_reason;
            }
          }
        }
      }
    } catch (err) {
      failed = err.name === "AbortError" ? "stopped" : err.message;
    } finally {
      state.controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
    }
    const seconds = (performance.now() - started) / 1000;
    if (failed && !answer) {
      bubble.remove();
      showError(failed);
      $("log").lastChild.dataset.state = "done";
      return;
    }
    bubble.dataset.state = "done";
    const meta = document.createElement("span");
    meta.className = "meta";
    const speed = usage ? `${usage.completion_tokens} tokens, ${(usage.completion_tokens / seconds).toFixed(1)} tok/s` : "";
    meta.textContent = [failed, finish === "length" ? "cut at max tokens" : "", speed].filter(Boolean).join(" · ");
    bubble.append(meta);
    if (failed) return;
    state.history.push(userMessage, { role: "assistant", content: answer });
    if (thumb) {
      state.image.sent = true;
      state.image.index = imageIndex;
      state.imagesInHistory += 1;
    }
    if (state.prompts.length) { state.prompts = []; drawPrompts(); }
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.imagesInHistory = 0;
    if (state.image) state.image.sent = false;
    $("log").replaceChildren();
    clearMasks();
  }

  async function connect() {
    try {
      const response = await fetch("/v1/models", { headers: headers() });
      if (!response.ok) {
        $("model-name").textContent = response.status === 401 ? "enter the API key" : await errorMessage(response);
        return;
      }
      const card = (await response.json()).data[0];
      state.model = card.id;
      state.capabilities = card.capabilities || state.capabilities;
      $("model-name").textContent = `${card.id} · context ${card.max_model_len}`;
      const caps = state.capabilities;
      const missing = [];
      if (!caps.visual_prompts) missing.push("take visual prompts");
      if (!caps.segmentation) missing.push("return masks");
      $("capability-note").textContent = missing.length
        ? `This model does not ${missing.join(" or ")}: you can draw boxes and points, but the server will refuse them.`
        : "This model takes boxes and points and returns masks.";
      document.body.dataset.ready = "true";
    } catch (err) {
      $("model-name").textContent = `cannot reach the server (${err.message})`;
    }
  }

  function setup() {
    const key = sessionStorage.getItem("unillava-api-key");
    if (key) $("api-key").value = key;
    $("api-key").addEventListener("change", () => {
      sessionStorage.setItem("unillava-api-key", $("api-key").value.trim());
      connect();
    });
    $("image-input").addEventListener("change", (e) => loadImageFile(e.target.files[0]));
    const zone = $("dropzone");
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer.files.length) loadImageFile(e.dataTransfer.files[0]);
    });
    document.addEventListener("paste", (e) => {
      const item = [...(e.clipboardData || {}).items || []].find((i) => i.type.startsWith("image/"));
      if (item) { e.preventDefault(); loadImageFile(item.getAsFile()); }
    });
    for (const b of document.querySelectorAll("#tools [data-tool]")) b.addEventListener("click", () => setTool(b.dataset.tool));
    $("clear-prompts").addEventListener("click", () => { state.prompts = []; drawPrompts(); });
    $("clear-masks").addEventListener("click", clearMasks);
    $("remove-image").addEventListener("click", removeImage);
    $("new-chat").addEventListener("click", newChat);
    $("stop").addEventListener("click", () => state.controller && state.controller.abort());
    $("composer").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = $("prompt").value.trim();
      if (!text) return;
      $("prompt").value = "";
      send(text);
    });
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); $("composer").requestSubmit(); }
    });
    setupDrawing();
    connect();
  }

  window.unillava = { state, decodeRle, renderMasks, clearMasks, setImage, send, setTool };
  setup();
})();
