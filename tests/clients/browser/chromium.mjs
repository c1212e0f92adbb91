// How every browser test starts Debian's Chromium: headless, quiet, with
// nothing fetched but what the test asks for.
export const chromiumOptions = {
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run"],
};
