// Label every body cell of a table with its column header (data-label), and mark tables of
// four or more columns (repro-stack): on a narrow screen repro-book.css shows such a table one
// row at a time, each cell as a "header: value" line. Loaded by book/_ext/reader_layout.py.
document.addEventListener("DOMContentLoaded", () => {
  for (const table of document.querySelectorAll(".bd-article table")) {
    const head = table.tHead;
    if (!head || !head.rows.length) continue;
    // The header row with the most cells names the columns (pandas adds an index-name row).
    const row = [...head.rows].reduce((a, b) => (b.cells.length > a.cells.length ? b : a));
    const labels = [];
    for (const th of row.cells)
      for (let k = 0; k < th.colSpan; k++) labels.push(th.textContent.trim());
    for (const body of table.tBodies)
      for (const tr of body.rows) {
        let col = 0;
        for (const cell of tr.cells) {
          if (labels[col]) cell.dataset.label = labels[col];
          col += cell.colSpan;
        }
      }
    if (labels.length >= 4) table.classList.add("repro-stack");
  }
});
