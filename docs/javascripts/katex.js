// Render the \( ... \) and \[ ... \] spans that pymdownx.arithmatex leaves,
// also after Material's instant navigation swaps the page.
document$.subscribe(() => {
  renderMathInElement(document.body, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
  });
});
