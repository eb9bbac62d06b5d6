// The packed package through `require` (its CommonJS entry point). Usage: node consumer.cjs ADDRESS DIR
"use strict";
const api = require("@aperture/backup-client");
const scenario = require("./scenario.cjs");

scenario(api, process.argv[2], process.argv[3]).then(
  (json) => console.log(json),
  (error) => {
    console.error(error);
    process.exit(1);
  },
);
